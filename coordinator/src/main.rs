//! `sangsaeng-coordinator`: the anchor company's coordinator daemon, its PKI
//! commands and its admin client. Parses arguments, sets up logging, builds the
//! typed config and hands over to the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use sangsaeng_common::config::roster::Roster;
use sangsaeng_common::identity::pki;
use sangsaeng_common::identity::tls::TlsFiles;
use sangsaeng_coordinator::config::{CoordinatorConfig, Overrides};

/// Sangsaeng coordinator: orchestrates federated training across a supply chain
/// over mutual-TLS gRPC, aggregating participants' weight deltas with FedAvg.
#[derive(Parser)]
#[command(name = "sangsaeng-coordinator", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator: accept participants, run trainings, write models and metrics.
    Serve(ServeArgs),
    /// Manage the project's certificate authority and certificates.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Talk to a running coordinator with an admin certificate.
    Admin(AdminArgs),
    /// Check the coordinator's audit log (hash chain and signatures).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Pull a released model and verify it, offline (no coordinator needed).
    #[command(subcommand)]
    Release(ReleaseCommand),
    /// Print the privacy loss ε a plan's `[privacy.dp]` will spend, round by round,
    /// before anyone trains (and the noise multiplier derived from its target).
    Privacy(PrivacyArgs),
    /// Pre-flight checks before `serve`: config, TLS files and certificate, the
    /// listen address, the roster, the output folder and the state store. Prints
    /// one line per check; exits non-zero if any check fails.
    Doctor {
        /// Config file (TOML), as given to `serve --config`.
        #[arg(long, env = "SANGSAENG_COORDINATOR_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Args)]
struct PrivacyArgs {
    /// The training plan, with a `[privacy.dp]` section.
    #[arg(long)]
    plan: PathBuf,
    /// Training rows at the site (record level: q = batch_size / rows, and each
    /// site spends its own ε). Not needed at client level.
    #[arg(long)]
    rows: Option<u64>,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify every entry: hash, signature, sequence and link. Reports the first
    /// entry where the chain breaks (an edit, a deletion, a reordering).
    Verify {
        /// The audit log (`<output_dir>/audit.jsonl`).
        #[arg(long)]
        log: PathBuf,
        /// The coordinator's certificate (PEM), whose key signed the entries.
        #[arg(long)]
        cert: PathBuf,
    },
}

#[derive(Subcommand)]
enum ReleaseCommand {
    /// Fetch a release (weights, card, provenance, signature) into a folder,
    /// checking every digest on the way.
    Pull {
        #[command(flatten)]
        from: ReleaseSource,
        /// Tag of the release.
        #[arg(long)]
        tag: String,
        /// Folder to write the files into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Verify a pulled release: the provenance signature by the coordinator,
    /// the weights against the provenance and, with --audit, the provenance
    /// against the signed audit log round by round.
    Verify {
        /// Folder written by `release pull`.
        #[arg(long)]
        dir: PathBuf,
        /// The coordinator's certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// The coordinator's audit log, to check the provenance against.
        #[arg(long)]
        audit: Option<PathBuf>,
    },
}

#[derive(Args)]
struct ReleaseSource {
    /// An OCI image-layout folder (the coordinator's default target: <output_dir>/registry).
    #[arg(long, group = "source", required_unless_present = "registry")]
    layout: Option<PathBuf>,
    /// A registry repository, e.g. registry.example.kr/ai-factory/te-classifier.
    #[arg(long, group = "source")]
    registry: Option<String>,
    /// Use plain HTTP for --registry (a registry on loopback).
    #[arg(long, requires = "registry")]
    plain_http: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// Config file (TOML). Its paths are relative to the file; options below override it.
    #[arg(long, env = "SANGSAENG_COORDINATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:7443 [default: 127.0.0.1:7443]
    #[arg(long, env = "SANGSAENG_LISTEN")]
    listen: Option<SocketAddr>,
    /// Roster of organisations (TOML): ids, tiers, roles, data agreements.
    #[arg(long, env = "SANGSAENG_ROSTER")]
    roster: Option<PathBuf>,
    /// Training plan (TOML) to start immediately; it waits for enough participants.
    #[arg(long, env = "SANGSAENG_PLAN")]
    plan: Option<PathBuf>,
    /// Folder for per-training outputs (models, metrics) [default: sangsaeng-runs]
    #[arg(long, env = "SANGSAENG_OUTPUT_DIR")]
    output_dir: Option<PathBuf>,
    /// Project CA certificate (PEM) that client certificates must chain to.
    #[arg(long, env = "SANGSAENG_CA")]
    ca: Option<PathBuf>,
    /// The coordinator's server certificate (PEM).
    #[arg(long, env = "SANGSAENG_CERT")]
    cert: Option<PathBuf>,
    /// The coordinator's private key (PEM).
    #[arg(long, env = "SANGSAENG_KEY")]
    key: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR/metrics: host:port, or :port (or
    /// port) for loopback. Off unless given here or as `metrics_listen`.
    #[arg(long, env = "SANGSAENG_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<String>,
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create the project CA and the coordinator's server certificate in a folder.
    Init {
        /// Folder to write ca.pem, ca.key, server.pem, server.key into.
        #[arg(long)]
        out: PathBuf,
        /// Subject name of the CA.
        #[arg(long, default_value = "Sangsaeng project CA")]
        name: String,
        /// DNS names and IP addresses of the coordinator (repeat the option).
        #[arg(long = "san", default_values = ["localhost", "127.0.0.1"])]
        sans: Vec<String>,
        /// Validity of the certificates in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
    /// Sign a participant's or admin's certificate request with the project CA.
    Sign {
        /// Folder holding ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// The certificate request (PEM) the organisation sent.
        #[arg(long)]
        csr: PathBuf,
        /// Organisation id the request must be for (checked against the roster if given).
        #[arg(long)]
        org: String,
        /// Roster to check the organisation against.
        #[arg(long)]
        roster: Option<PathBuf>,
        /// Where to write the signed certificate (PEM).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Issue everything for a local demo: CA, server certificate, and a key and
    /// certificate for every organisation in the roster (keys are generated here,
    /// so use this only when one machine plays every role).
    Demo {
        #[arg(long)]
        roster: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long = "san", default_values = ["localhost", "127.0.0.1"])]
        sans: Vec<String>,
    },
    /// Print the SHA-256 fingerprint of a certificate (to check a CA out of band).
    Fingerprint { cert: PathBuf },
}

#[derive(Args)]
struct AdminArgs {
    /// Coordinator address.
    #[arg(
        long,
        env = "SANGSAENG_COORDINATOR",
        default_value = "https://127.0.0.1:7443"
    )]
    coordinator: String,
    /// Name in the coordinator's certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Project CA certificate (PEM).
    #[arg(long, env = "SANGSAENG_CA")]
    ca: PathBuf,
    /// Admin certificate (PEM); its organisation must have role "admin" in the roster.
    #[arg(long, env = "SANGSAENG_CERT")]
    cert: PathBuf,
    /// Admin private key (PEM).
    #[arg(long, env = "SANGSAENG_KEY")]
    key: PathBuf,
    #[command(subcommand)]
    action: AdminAction,
}

#[derive(Subcommand)]
enum AdminAction {
    /// Show participants (connected, last seen, last error) and the training's phase and round.
    Status,
    /// Start a training from a plan file.
    Start {
        #[arg(long)]
        plan: PathBuf,
    },
    /// Release a completed training's model under a policy of opening rules.
    /// Prints every rule with its value and pass/fail; exits with status 1 when
    /// a rule fails (nothing is released then).
    Release {
        /// Training id (see `admin status`).
        #[arg(long)]
        training: String,
        /// Opening-rules policy (TOML); see docs/RELEASE.md.
        #[arg(long)]
        policy: PathBuf,
        /// Registry repository to push to; without it the coordinator writes its
        /// OCI layout folder (<output_dir>/registry).
        #[arg(long)]
        registry: Option<String>,
        /// Use plain HTTP for --registry (a registry on loopback).
        #[arg(long, requires = "registry")]
        plain_http: bool,
        /// Tag of the release [default: the training id].
        #[arg(long, default_value = "")]
        tag: String,
    },
}

fn main() -> anyhow::Result<()> {
    // Before the runtime starts its threads, so that none of them has its own arena.
    sangsaeng_common::process::single_malloc_arena();
    tokio::runtime::Runtime::new()?.block_on(async_main())
}

async fn async_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The doctor reports problems itself; the library's warnings would repeat them.
    let doctor = matches!(cli.command, Command::Doctor { .. });
    sangsaeng_common::process::init_logging(if doctor { "error" } else { "info" });
    // One rustls provider (ring) for tonic and for the registry client.
    sangsaeng_common::identity::tls::install_crypto_provider();
    match cli.command {
        Command::Serve(a) => serve(a).await,
        Command::Pki(p) => pki_command(p),
        Command::Admin(a) => admin(a).await,
        Command::Audit(a) => audit_command(a),
        Command::Release(r) => release_command(r).await,
        Command::Privacy(p) => privacy_command(p),
        Command::Doctor { config } => doctor_command(&config),
    }
}

fn doctor_command(config: &Path) -> anyhow::Result<()> {
    use sangsaeng_coordinator::doctor;
    let checks = doctor::run_checks(config);
    for c in &checks {
        println!("{c}");
    }
    let failed = checks
        .iter()
        .filter(|c| c.outcome == doctor::Outcome::Fail)
        .count();
    if failed > 0 {
        eprintln!("{failed} check(s) failed");
        std::process::exit(1);
    }
    println!("all checks passed");
    Ok(())
}

fn privacy_command(a: PrivacyArgs) -> anyhow::Result<()> {
    use sangsaeng_common::privacy::dp::budget::plan_budget;
    let plan = sangsaeng_common::config::plan::TrainingPlan::from_file(&a.plan)?;
    let b = plan_budget(&plan, a.rows)
        .with_context(|| format!("accounting the privacy budget of {}", a.plan.display()))?;
    let how = if b.derived {
        "derived from the target"
    } else {
        "from the plan"
    };
    println!(
        "level {}, delta {:e}, target epsilon {}",
        b.level.name(),
        b.delta,
        b.target_epsilon
    );
    println!(
        "sampling rate q = {:.6}, {} steps per round, noise multiplier {:.4} ({how})",
        b.q, b.steps_per_round, b.noise_multiplier
    );
    println!("round  epsilon");
    for (i, e) in b.epsilon_by_round.iter().enumerate() {
        println!("{:>5}  {e:.4}", i + 1);
    }
    if !b.within_target() {
        anyhow::bail!(
            "the plan spends epsilon {:.4} in {} rounds, above its target {}: raise noise_multiplier or lower the rounds",
            b.total_epsilon(),
            plan.training.rounds,
            b.target_epsilon
        );
    }
    println!(
        "total epsilon {:.4} <= target {} (RDP accountant, Poisson sampling)",
        b.total_epsilon(),
        b.target_epsilon
    );
    Ok(())
}

fn audit_command(a: AuditCommand) -> anyhow::Result<()> {
    match a {
        AuditCommand::Verify { log, cert } => {
            let verifier =
                sangsaeng_common::identity::signing::Verifier::from_cert_pem_file(&cert)?;
            match sangsaeng_coordinator::durable::audit::verify_file(&log, &verifier) {
                Ok(r) => {
                    println!(
                        "{}: {} entries, chain and signatures intact; head {}",
                        log.display(),
                        r.entries,
                        r.head
                    );
                    Ok(())
                }
                Err(e) => anyhow::bail!("the audit log does not verify: {e}"),
            }
        }
    }
}

async fn release_command(r: ReleaseCommand) -> anyhow::Result<()> {
    use sangsaeng_coordinator::release::{self, oci};
    match r {
        ReleaseCommand::Pull { from, tag, out } => {
            let source = match (from.layout, from.registry) {
                (Some(dir), _) => oci::Source::Layout(dir),
                (None, Some(r)) => {
                    oci::Source::Registry(oci::Registry::parse(&r, from.plain_http)?)
                }
                (None, None) => unreachable!("clap requires one source"),
            };
            let pulled = oci::pull(&source, &tag).await?;
            oci::save(&pulled, &out)?;
            println!("pulled release '{tag}' into {}", out.display());
            println!("  model manifest     {}", pulled.model_digest);
            println!("  signature manifest {}", pulled.signature_digest);
        }
        ReleaseCommand::Verify { dir, cert, audit } => {
            let verifier =
                sangsaeng_common::identity::signing::Verifier::from_cert_pem_file(&cert)?;
            let v = release::verify(&dir, &verifier, audit.as_deref())?;
            println!(
                "verified: training {}, {} rounds, final parameters sha256 {}{}",
                v.training,
                v.rounds,
                v.final_params_sha256,
                if v.audit_checked {
                    "; provenance matches the signed audit log"
                } else {
                    " (audit log not checked: pass --audit)"
                }
            );
        }
    }
    Ok(())
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let config = CoordinatorConfig::build(
        a.config.as_deref(),
        Overrides {
            listen: a.listen,
            roster: a.roster,
            plan: a.plan,
            output_dir: a.output_dir,
            ca: a.ca,
            cert: a.cert,
            key: a.key,
            metrics_listen: a.metrics_listen,
        },
    )?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let shutdown = CancellationToken::new();
    sangsaeng_common::process::cancel_on_signal(shutdown.clone(), "finishing in-flight requests");
    sangsaeng_coordinator::run(listener, config, shutdown).await?;
    Ok(())
}

fn pki_command(p: PkiCommand) -> anyhow::Result<()> {
    match p {
        PkiCommand::Init {
            out,
            name,
            sans,
            days,
        } => {
            init_ca(&out, &name, &sans, days)?;
        }
        PkiCommand::Sign {
            ca_dir,
            csr,
            org,
            roster,
            out,
            days,
        } => {
            if let Some(r) = roster {
                let roster = Roster::from_file(&r)?;
                anyhow::ensure!(
                    roster.get(&org).is_some(),
                    "organisation '{org}' is not in {}; add it to the roster first",
                    r.display()
                );
            }
            let ca = pki::CaBundle::load(ca_dir.join("ca.pem"), ca_dir.join("ca.key"))?;
            let csr_pem = std::fs::read_to_string(&csr)
                .with_context(|| format!("reading {}", csr.display()))?;
            let cert = pki::sign_csr(&ca, &csr_pem, Some(&org), days)?;
            pki::write_public(&out, &cert)?;
            println!(
                "signed certificate for '{org}' written to {}",
                out.display()
            );
            println!(
                "CA fingerprint (SHA-256): {}",
                pki::fingerprint_sha256(&ca.cert_pem)?
            );
        }
        PkiCommand::Demo { roster, out, sans } => {
            let roster = Roster::from_file(&roster)?;
            let ca = init_ca(&out, "Sangsaeng demo CA", &sans, 825)?;
            for org in roster.iter() {
                let (cert, key) = pki::issue_client_cert(&ca, &org.id, 365)?;
                pki::write_public(out.join(format!("{}.pem", org.id)), &cert)?;
                pki::write_private_key(out.join(format!("{}.key", org.id)), &key)?;
                println!(
                    "issued {}.pem / {}.key ({}, {})",
                    org.id, org.id, org.tier, org.role
                );
            }
        }
        PkiCommand::Fingerprint { cert } => {
            let pem = std::fs::read_to_string(&cert)
                .with_context(|| format!("reading {}", cert.display()))?;
            println!("{}", pki::fingerprint_sha256(&pem)?);
        }
    }
    Ok(())
}

fn init_ca(out: &Path, name: &str, sans: &[String], days: u32) -> anyhow::Result<pki::CaBundle> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // Replacing a CA key silently would invalidate every certificate already issued.
    anyhow::ensure!(
        !out.join("ca.key").exists(),
        "{} already holds a CA key; refusing to replace it (every certificate it signed would stop working). Use another folder or move the old CA away first",
        out.display()
    );
    let ca = pki::CaBundle::create(name, days)?;
    ca.write(out)?;
    let (cert, key) = pki::issue_server_cert(&ca, "sangsaeng-coordinator", sans, days)?;
    pki::write_public(out.join("server.pem"), &cert)?;
    pki::write_private_key(out.join("server.key"), &key)?;
    println!("CA and server certificate written to {}", out.display());
    println!("server names: {}", sans.join(", "));
    println!(
        "CA fingerprint (SHA-256), give it to suppliers to check out of band:\n  {}",
        pki::fingerprint_sha256(&ca.cert_pem)?
    );
    Ok(ca)
}

async fn admin(a: AdminArgs) -> anyhow::Result<()> {
    let tls = TlsFiles {
        ca: a.ca,
        cert: a.cert,
        key: a.key,
    }
    .load()?;
    let mut client =
        sangsaeng_coordinator::client::AdminClient::connect(&a.coordinator, &tls, &a.server_name)
            .await?;
    match a.action {
        AdminAction::Status => {
            let s = client.status().await?;
            print!("{}", sangsaeng_coordinator::client::render_status(&s));
        }
        AdminAction::Start { plan } => {
            let text = std::fs::read_to_string(&plan)
                .with_context(|| format!("reading {}", plan.display()))?;
            let id = client.start_training(text).await?;
            println!("training {id} started");
        }
        AdminAction::Release {
            training,
            policy,
            registry,
            plain_http,
            tag,
        } => {
            let policy_toml = std::fs::read_to_string(&policy)
                .with_context(|| format!("reading {}", policy.display()))?;
            let r = client
                .release(sangsaeng_proto::v1::ReleaseRequest {
                    training_id: training,
                    policy_toml,
                    registry: registry.unwrap_or_default(),
                    plain_http,
                    tag,
                })
                .await?;
            print!("{}", sangsaeng_coordinator::client::render_release(&r));
            if !r.released {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
