//! The roster: which organisations belong to the federation, in what tier and role,
//! and whether each signed the data submission agreement.
//!
//! Roles live here and not in certificates, so promoting a supplier's operator to
//! admin (or revoking it) is a roster edit, not a new certificate. The coordinator
//! checks the caller's certificate identity against this file on every RPC; an
//! organisation removed from the roster is refused even with a valid certificate.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use crate::{Error, Result};

/// What an organisation may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs a participant daemon: subscribes, trains, uploads deltas.
    Participant,
    /// Administers the federation: status, starting trainings.
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Participant => "participant",
            Role::Admin => "admin",
        })
    }
}

/// The data submission agreement that allows a contribution to be released to the government.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agreement {
    pub signed: bool,
    /// Date of signature, `YYYY-MM-DD`; required when `signed = true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date: Option<String>,
}

/// One organisation of the supply chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Organisation {
    /// Identifier; equals the subject of the organisation's certificate.
    pub id: String,
    /// Display name, e.g. "Hanbit Motors Ulsan plant".
    pub name: String,
    /// "anchor", or "tier-N" with N >= 1.
    pub tier: String,
    pub role: Role,
    #[serde(default = "unsigned")]
    pub agreement: Agreement,
}

fn unsigned() -> Agreement {
    Agreement {
        signed: false,
        date: None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RosterFile {
    #[serde(rename = "organisation", default)]
    organisations: Vec<Organisation>,
}

/// The validated roster, indexed by organisation id.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Roster {
    orgs: BTreeMap<String, Organisation>,
}

impl Roster {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let file: RosterFile = toml::from_str(text)
            .map_err(|e| Error::config(origin, crate::config::plan::toml_message(&e)))?;
        Self::from_organisations(file.organisations).map_err(|m| Error::config(origin, m))
    }

    /// Builds and validates a roster; the message names the organisation and key at fault.
    pub fn from_organisations(orgs: Vec<Organisation>) -> std::result::Result<Self, String> {
        if orgs.is_empty() {
            return Err("no [[organisation]] entries: the roster must list at least one".into());
        }
        let mut map = BTreeMap::new();
        for (i, o) in orgs.into_iter().enumerate() {
            let at = format!("organisation #{} ('{}')", i + 1, o.id);
            validate_org_id(&o.id).map_err(|e| format!("{at}: id: {e}"))?;
            if o.name.trim().is_empty() {
                return Err(format!("{at}: name must not be empty"));
            }
            if !valid_tier(&o.tier) {
                return Err(format!(
                    "{at}: tier '{}' is not 'anchor' or 'tier-N' (N >= 1)",
                    o.tier
                ));
            }
            match (&o.agreement.signed, &o.agreement.date) {
                (true, None) => {
                    return Err(format!(
                        "{at}: agreement.date is required when agreement.signed = true"
                    ));
                }
                (_, Some(d)) => {
                    let fmt = time::macros::format_description!("[year]-[month]-[day]");
                    time::Date::parse(d, &fmt).map_err(|_| {
                        format!("{at}: agreement.date '{d}' is not a date in YYYY-MM-DD form")
                    })?;
                }
                _ => {}
            }
            if map.insert(o.id.clone(), o).is_some() {
                return Err(format!("{at}: id is listed twice"));
            }
        }
        Ok(Roster { orgs: map })
    }

    pub fn get(&self, id: &str) -> Option<&Organisation> {
        self.orgs.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Organisation> {
        self.orgs.values()
    }

    pub fn with_role(&self, role: Role) -> impl Iterator<Item = &Organisation> {
        self.orgs.values().filter(move |o| o.role == role)
    }

    /// Checks that `id` is on the roster with `role`; the error says why not, in words.
    pub fn authorize(&self, id: &str, role: Role) -> std::result::Result<&Organisation, String> {
        match self.orgs.get(id) {
            None => Err(format!(
                "'{id}' is not on the federation's roster; ask the anchor company's administrator to add it"
            )),
            Some(o) if o.role != role => Err(format!(
                "'{id}' has role '{}' in the roster; this call needs role '{role}'",
                o.role
            )),
            Some(o) => Ok(o),
        }
    }

    pub fn to_toml(&self) -> String {
        let file = RosterFile {
            organisations: self.orgs.values().cloned().collect(),
        };
        toml::to_string_pretty(&file).expect("a roster always serialises")
    }
}

fn valid_tier(t: &str) -> bool {
    t == "anchor"
        || t.strip_prefix("tier-")
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n >= 1)
}

/// Longest accepted organisation id. 64 is the X.520 upper bound for a
/// CommonName, so an id always fits in the CN as well as in the URI SAN.
pub const MAX_ORG_ID_LEN: usize = 64;

/// Checks an organisation id: 1 to 64 characters from `[a-z0-9-]`.
///
/// The alphabet is small on purpose: ids end up in certificate names, URIs,
/// file names and log lines, and a lower-case-only alphabet rules out
/// look-alike ids that differ only in case or Unicode form.
pub fn validate_org_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::Pki("organisation id is empty".into()));
    }
    if id.len() > MAX_ORG_ID_LEN {
        return Err(Error::Pki(format!(
            "organisation id '{}…' is {} characters long; at most {MAX_ORG_ID_LEN} are allowed",
            id.chars().take(16).collect::<String>(),
            id.len()
        )));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(Error::Pki(format!(
            "organisation id '{}' contains {bad:?}; only a-z, 0-9 and '-' are allowed",
            id.escape_default()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROSTER: &str = r#"
[[organisation]]
id = "hanbit-motors"
name = "Hanbit Motors"
tier = "anchor"
role = "participant"
agreement = { signed = true, date = "2026-03-02" }

[[organisation]]
id = "hanbit-admin"
name = "Hanbit Motors federation office"
tier = "anchor"
role = "admin"

[[organisation]]
id = "daesung-parts"
name = "Daesung Parts"
tier = "tier-1"
role = "participant"
agreement = { signed = false }
"#;

    #[test]
    fn parses_and_authorizes_by_role() {
        let r = Roster::from_toml(ROSTER, "roster.toml").unwrap();
        assert_eq!(r.iter().count(), 3);
        assert!(r.authorize("hanbit-motors", Role::Participant).is_ok());
        let e = r.authorize("hanbit-motors", Role::Admin).unwrap_err();
        assert!(e.contains("needs role 'admin'"), "{e}");
        let e = r.authorize("stranger", Role::Participant).unwrap_err();
        assert!(e.contains("not on the federation's roster"), "{e}");
        assert!(!r.get("daesung-parts").unwrap().agreement.signed);
        assert_eq!(Roster::from_toml(&r.to_toml(), "x").unwrap(), r);
    }

    #[test]
    fn bad_rosters_are_refused_with_the_key() {
        for (from, to, needle) in [
            ("tier = \"tier-1\"", "tier = \"tier-0\"", "tier 'tier-0'"),
            ("role = \"admin\"", "role = \"boss\"", "role"),
            (
                "date = \"2026-03-02\"",
                "date = \"2026-13-40\"",
                "agreement.date",
            ),
            (
                "agreement = { signed = true, date = \"2026-03-02\" }",
                "agreement = { signed = true }",
                "agreement.date is required",
            ),
            (
                "id = \"daesung-parts\"",
                "id = \"hanbit-motors\"",
                "listed twice",
            ),
            ("id = \"daesung-parts\"", "id = \"Daesung Parts!\"", "id:"),
            (
                "name = \"Daesung Parts\"",
                "name = \"Daesung Parts\"\ncolour = \"red\"",
                "colour",
            ),
        ] {
            let text = ROSTER.replace(from, to);
            let err = Roster::from_toml(&text, "roster.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains("roster.toml"), "{err}");
            assert!(err.contains(needle), "{to}: {err}");
        }
        assert!(
            Roster::from_toml("", "r")
                .unwrap_err()
                .to_string()
                .contains("at least one")
        );
    }
}
