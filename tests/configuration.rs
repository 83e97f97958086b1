//! docs/CONFIGURATION.md never drifts from the code: its key tables are generated
//! from the configuration structs themselves (field names, types, serde defaults
//! and `///` docs), and this test fails when the committed file differs from
//! what the code generates. Regenerate after changing a config struct with
//!
//! ```sh
//! SANGSAENG_BLESS=1 cargo test --test configuration
//! ```
//!
//! The example TOML blocks of the file are also parsed by the real parsers
//! (`deny_unknown_fields`), so a renamed or removed key cannot survive in them.
//!
//! The generator reads the Rust sources rather than reflecting at run time
//! because the docs, the defaults' expressions and the enum spellings exist only
//! there; the source style it relies on (one field per line, `///` docs above,
//! `#[serde(...)]` attributes) is what rustfmt produces.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each generated section: its marker name, the source files (", "-separated)
/// and the root struct.
const SECTIONS: &[(&str, &str, &str)] = &[
    (
        "plan.toml",
        "common/src/config/plan.rs, common/src/config/privacy.rs, common/src/config/aggregation.rs",
        "TrainingPlan",
    ),
    (
        "coordinator.toml",
        "coordinator/src/config.rs",
        "ConfigFile",
    ),
    (
        "participant.toml",
        "participant/src/config.rs",
        "FileConfig",
    ),
    (
        "release-policy.toml",
        "coordinator/src/release/policy.rs",
        "Policy",
    ),
];

#[derive(Debug, Default)]
struct Field {
    name: String,
    ty: String,
    docs: Vec<String>,
    serde: Vec<String>,
}

#[derive(Debug, Default)]
struct Struct {
    docs: Vec<String>,
    serde: Vec<String>,
    fields: Vec<Field>,
}

#[derive(Debug, Default)]
struct Enum {
    rename_all: Option<String>,
    variants: Vec<(String, bool)>,
}

#[derive(Debug, Default)]
struct Source {
    structs: BTreeMap<String, Struct>,
    enums: BTreeMap<String, Enum>,
    /// `fn name() -> T { expr }`: the expressions of serde's `default = "name"`.
    default_fns: BTreeMap<String, String>,
    /// `impl Default for X { X { field: expr, ... } }`.
    default_impls: BTreeMap<String, BTreeMap<String, String>>,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn serde_attr(line: &str) -> Option<String> {
    let inner = line.strip_prefix("#[serde(")?.strip_suffix(")]")?;
    Some(inner.to_string())
}

fn parse(text: &str) -> Source {
    let lines: Vec<&str> = text.lines().collect();
    let mut src = Source::default();
    let (mut docs, mut serde) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if let Some(d) = line.strip_prefix("///") {
            docs.push(d.trim().to_string());
        } else if let Some(s) = serde_attr(line) {
            serde.push(s);
        } else if line.starts_with("#[") {
        } else if let Some(rest) = item_name(line, "struct") {
            if line.ends_with('{') {
                let (s, next) = parse_struct(&lines, i + 1);
                let s = Struct {
                    docs: std::mem::take(&mut docs),
                    serde: std::mem::take(&mut serde),
                    ..s
                };
                src.structs.insert(rest, s);
                i = next;
                continue;
            }
        } else if let Some(rest) = item_name(line, "enum") {
            let (variants, next) = parse_enum(&lines, i + 1);
            let rename_all = serde.iter().find_map(|s| {
                s.strip_prefix("rename_all = ")
                    .map(|v| v.trim_matches('"').to_string())
            });
            src.enums.insert(
                rest,
                Enum {
                    rename_all,
                    variants,
                },
            );
            (docs, serde) = (Vec::new(), Vec::new());
            i = next;
            continue;
        } else if let Some(name) = line.strip_prefix("fn ").and_then(|l| l.split("()").next())
            && line.ends_with('{')
            && i + 2 < lines.len()
            && lines[i + 2].trim() == "}"
        {
            src.default_fns
                .insert(name.to_string(), lines[i + 1].trim().to_string());
        } else if let Some(ty) = line
            .strip_prefix("impl Default for ")
            .and_then(|l| l.strip_suffix(" {"))
        {
            src.default_impls
                .insert(ty.to_string(), parse_default_impl(&lines, i + 1));
        } else {
            (docs, serde) = (Vec::new(), Vec::new());
        }
        i += 1;
    }
    src
}

/// The name of a `struct` or `enum` item, public or not.
fn item_name(line: &str, kind: &str) -> Option<String> {
    let rest = line
        .strip_prefix("pub ")
        .unwrap_or(line)
        .strip_prefix(kind)?;
    let name: String = rest
        .trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

fn parse_struct(lines: &[&str], mut i: usize) -> (Struct, usize) {
    let mut s = Struct::default();
    let mut f = Field::default();
    while i < lines.len() && lines[i] != "}" {
        let line = lines[i].trim();
        if let Some(d) = line.strip_prefix("///") {
            f.docs.push(d.trim().to_string());
        } else if let Some(a) = serde_attr(line) {
            f.serde.push(a);
        } else if let Some((name, ty)) = line.strip_suffix(',').and_then(|l| l.split_once(": ")) {
            let cfg_test = i > 0 && lines[i - 1].trim() == "#[cfg(test)]";
            f.name = name.trim_start_matches("pub ").to_string();
            f.ty = ty.to_string();
            if !cfg_test {
                s.fields.push(std::mem::take(&mut f));
            }
            f = Field::default();
        }
        i += 1;
    }
    (s, i + 1)
}

fn parse_enum(lines: &[&str], mut i: usize) -> (Vec<(String, bool)>, usize) {
    let mut variants = Vec::new();
    let mut is_default = false;
    while i < lines.len() && lines[i] != "}" {
        let line = lines[i].trim();
        if line == "#[default]" {
            is_default = true;
        } else if let Some(v) = line.strip_suffix(',')
            && v.chars().all(|c| c.is_alphanumeric())
        {
            variants.push((v.to_string(), is_default));
            is_default = false;
        }
        i += 1;
    }
    (variants, i + 1)
}

fn parse_default_impl(lines: &[&str], mut i: usize) -> BTreeMap<String, String> {
    let mut values = BTreeMap::new();
    while i < lines.len() && lines[i] != "}" {
        if let Some((k, v)) = lines[i]
            .trim()
            .strip_suffix(',')
            .and_then(|l| l.split_once(": "))
        {
            values.insert(k.to_string(), v.to_string());
        }
        i += 1;
    }
    values
}

/// How a variant is spelled in TOML under the enum's `rename_all`.
fn spell(variant: &str, rename_all: Option<&str>) -> String {
    let mut words = String::new();
    for (k, c) in variant.chars().enumerate() {
        if c.is_uppercase() && k > 0 {
            words.push(if rename_all == Some("kebab-case") {
                '-'
            } else {
                '_'
            });
        }
        words.push(c.to_ascii_lowercase());
    }
    match rename_all {
        Some("lowercase") => words.replace(['_', '-'], ""),
        _ => words,
    }
}

fn inner<'a>(ty: &'a str, wrapper: &str) -> Option<&'a str> {
    ty.strip_prefix(wrapper)?
        .strip_prefix('<')?
        .strip_suffix('>')
}

/// A field's TOML type, in words.
fn describe_type(src: &Source, ty: &str) -> String {
    if let Some(t) = inner(ty, "Option") {
        return describe_type(src, t);
    }
    if let Some(t) = inner(ty, "Vec") {
        return format!("array of {}", describe_type(src, t));
    }
    if let Some(e) = src.enums.get(ty) {
        let names: Vec<String> = e
            .variants
            .iter()
            .map(|(v, _)| format!("`\"{}\"`", spell(v, e.rename_all.as_deref())))
            .collect();
        return names.join(" \\| ");
    }
    match ty {
        "String" => "string".into(),
        "PathBuf" => "path".into(),
        "SocketAddr" => "address (`host:port`)".into(),
        "bool" => "boolean".into(),
        "f64" | "f32" => "number".into(),
        t if t.starts_with('u') || t.starts_with('i') => "integer".into(),
        t => format!("`{t}`"),
    }
}

/// The default a field takes when the key is absent, or "required".
fn describe_default(src: &Source, owner: &Struct, owner_name: &str, f: &Field) -> String {
    let ty = f.ty.as_str();
    if let Some(d) = f.serde.iter().find_map(|s| s.strip_prefix("default = ")) {
        let fname = d.trim_matches('"');
        return src
            .default_fns
            .get(fname)
            .map(|v| format!("`{v}`"))
            .unwrap_or_else(|| format!("`{fname}()`"));
    }
    let struct_default = owner
        .serde
        .iter()
        .any(|s| s.split(", ").any(|p| p == "default"));
    if struct_default
        && let Some(v) = src
            .default_impls
            .get(owner_name)
            .and_then(|m| m.get(&f.name))
    {
        return format!("`{v}`");
    }
    let field_default = f
        .serde
        .iter()
        .any(|s| s.split(", ").any(|p| p == "default"));
    if ty.starts_with("Option<") {
        return "optional".into();
    }
    if field_default || struct_default {
        if src.structs.contains_key(ty) {
            return "see the table".into();
        }
        if let Some(e) = src.enums.get(ty) {
            let v = e.variants.iter().find(|(_, d)| *d).map(|(v, _)| v.as_str());
            return v
                .map(|v| format!("`\"{}\"`", spell(v, e.rename_all.as_deref())))
                .unwrap_or_else(|| "the type's default".into());
        }
        return match ty {
            "bool" => "`false`".into(),
            "f64" | "f32" => "`0.0`".into(),
            "String" => "`\"\"`".into(),
            t if t.starts_with("Vec<") => "`[]`".into(),
            _ => "`0`".into(),
        };
    }
    "**required**".into()
}

/// The table of one struct, then the tables of the structs its fields hold.
fn render_table(src: &Source, name: &str, path: &str, out: &mut String) {
    let s = &src.structs[name];
    let heading = if path.is_empty() {
        "top level".to_string()
    } else {
        format!("`[{path}]`")
    };
    out.push_str(&format!("\n#### {heading}\n\n"));
    if !s.docs.is_empty() {
        out.push_str(&format!("{}\n\n", s.docs.join(" ")));
    }
    out.push_str("| key | type | default | meaning |\n| --- | --- | --- | --- |\n");
    let mut nested = Vec::new();
    for f in &s.fields {
        if f.serde.iter().any(|a| a.contains("skip_deserializing"))
            || f.docs.iter().any(|d| d.contains("Never written by hand"))
        {
            continue;
        }
        let bare = inner(&f.ty, "Option").unwrap_or(&f.ty);
        if src.structs.contains_key(bare) {
            let p = if path.is_empty() {
                f.name.clone()
            } else {
                format!("{path}.{}", f.name)
            };
            out.push_str(&format!(
                "| `{}` | table | {} | see `[{p}]` below. {} |\n",
                f.name,
                describe_default(src, s, name, f),
                f.docs.join(" ")
            ));
            nested.push((bare.to_string(), p));
            continue;
        }
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            f.name,
            describe_type(src, &f.ty),
            describe_default(src, s, name, f),
            f.docs.join(" ").replace('|', "\\|")
        ));
    }
    for (ty, p) in nested {
        render_table(src, &ty, &p, out);
    }
}

fn generate(marker: &str, file: &str, root_struct: &str) -> String {
    let text: String = file
        .split(", ")
        .map(|f| std::fs::read_to_string(root().join(f)).unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let src = parse(&text);
    assert!(
        src.structs.contains_key(root_struct),
        "{file}: struct {root_struct} not found by the generator"
    );
    let mut out = format!("<!-- generated: {marker} (tests/configuration.rs, from {file}) -->\n");
    render_table(&src, root_struct, "", &mut out);
    out.push_str("\n<!-- end generated -->");
    out
}

/// The committed file with every generated section replaced by what the code generates now.
fn regenerated(doc: &str) -> String {
    let mut doc = doc.to_string();
    for (marker, file, root_struct) in SECTIONS {
        let start_tag = format!("<!-- generated: {marker} ");
        let start = doc
            .find(&start_tag)
            .unwrap_or_else(|| panic!("docs/CONFIGURATION.md has no section '{start_tag}...'"));
        let end = start
            + doc[start..]
                .find("<!-- end generated -->")
                .expect("an end marker")
            + "<!-- end generated -->".len();
        doc.replace_range(start..end, &generate(marker, file, root_struct));
    }
    doc
}

#[test]
fn configuration_reference_matches_the_code() {
    let path = root().join("docs/CONFIGURATION.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let fresh = regenerated(&doc);
    if std::env::var("SANGSAENG_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &fresh).unwrap();
        return;
    }
    if fresh != doc {
        let first = fresh
            .lines()
            .zip(doc.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        panic!(
            "docs/CONFIGURATION.md is out of date with the config structs (first difference at line {}):\n  code: {}\n  file: {}\nregenerate with: SANGSAENG_BLESS=1 cargo test --test configuration",
            first + 1,
            fresh.lines().nth(first).unwrap_or(""),
            doc.lines().nth(first).unwrap_or("")
        );
    }
}

/// Every ```toml block of the file whose first line names its kind
/// (`# plan.toml`, `# coordinator.toml`, `# participant.toml`, `# release-policy.toml`).
fn examples(doc: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = doc;
    while let Some(start) = rest.find("```toml\n") {
        let body = &rest[start + 8..];
        let end = body.find("```").expect("a closed code block");
        let block = &body[..end];
        if let Some(kind) = block.lines().next().and_then(|l| l.strip_prefix("# ")) {
            out.push((kind.trim().to_string(), block.to_string()));
        }
        rest = &body[end + 3..];
    }
    out
}

#[test]
fn every_example_in_the_configuration_reference_is_accepted() {
    let doc = std::fs::read_to_string(root().join("docs/CONFIGURATION.md")).unwrap();
    let blocks = examples(&doc);
    let kinds: Vec<&str> = blocks.iter().map(|(k, _)| k.as_str()).collect();
    for (marker, _, _) in SECTIONS {
        assert!(
            kinds.contains(marker),
            "docs/CONFIGURATION.md has no example of {marker}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    for (kind, block) in blocks {
        let file = dir.path().join(&kind);
        std::fs::write(&file, &block).unwrap();
        let outcome = match kind.as_str() {
            "plan.toml" => sangsaeng::common::config::plan::TrainingPlan::from_toml(&block, &kind)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            "coordinator.toml" => {
                toml::from_str::<sangsaeng::coordinator::config::ConfigFile>(&block)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            "participant.toml" => sangsaeng::participant::config::ParticipantConfig::build(
                Some(&file),
                sangsaeng::participant::config::Overrides::default(),
            )
            .map(|_| ())
            .map_err(|e| e.to_string()),
            "release-policy.toml" => {
                sangsaeng::coordinator::release::policy::Policy::from_toml(&block, &kind)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            other => panic!("unknown example kind '{other}'"),
        };
        if let Err(e) = outcome {
            panic!("the {kind} example in docs/CONFIGURATION.md is refused: {e}\n{block}");
        }
    }
}
