//! `portcullis audit …`: verify the hash chain and list records, straight against the
//! database the configuration names. Both only read: they run no migration, so a
//! read-only database role is enough.

use std::io::Write;
use std::process::ExitCode;

use clap::Subcommand;

use super::clients::{Target, load_config};
use super::{EXIT_CONFIG, EXIT_FAILURE, runtime};
use crate::audit::{AuditFilter, ChainBreak, RawFilter};
use crate::db::Database;

/// Exit status of `audit verify` when the chain is broken (1 is kept for "could not
/// check", 2 for command-line errors).
pub const EXIT_CHAIN_BROKEN: u8 = 3;

/// `portcullis audit …`
#[derive(Debug, Subcommand)]
pub(super) enum AuditCommand {
    /// Walk the whole hash chain: exit 0 with "N records, chain intact", or 3 naming the
    /// first broken seq and why (hash mismatch, gap, prev mismatch, truncation).
    Verify {
        #[command(flatten)]
        target: Target,
        /// Print the outcome as one JSON object.
        #[arg(long)]
        json: bool,
        /// Start after this seq: the last record of a range archived and deleted (the
        /// first record walked must be the next one); with --from-hash.
        #[arg(long, requires = "from_hash", value_parser = clap::value_parser!(i64).range(1..))]
        from_seq: Option<i64>,
        /// The hash of the record --from-seq names, as written down when it was archived
        /// (64 lowercase hex digits).
        #[arg(long, requires = "from_seq", value_parser = parse_hash)]
        from_hash: Option<String>,
    },
    /// Print records, oldest first, one JSON object per line.
    List {
        #[command(flatten)]
        target: Target,
        /// An action (`login.success`) or a prefix (`login.*`).
        #[arg(long)]
        action: Option<String>,
        /// Exact actor (`client:svc-orders`, `user:alice`, …).
        #[arg(long)]
        actor: Option<String>,
        /// Exact target (a client id, a kid, `prod/executor-orders`, …); a kid may begin
        /// with `-`.
        #[arg(long = "target", value_name = "TARGET", allow_hyphen_values = true)]
        on: Option<String>,
        /// Records at or after this instant (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Records before this instant (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Records after this seq.
        #[arg(long)]
        after_seq: Option<String>,
        /// At most this many records (default: every match).
        #[arg(long)]
        limit: Option<u64>,
    },
}

impl AuditCommand {
    fn target(&self) -> &Target {
        match self {
            Self::Verify { target, .. } | Self::List { target, .. } => target,
        }
    }
}

/// Runs `portcullis audit …`.
pub(super) fn run(cmd: AuditCommand) -> ExitCode {
    let config = match load_config(cmd.target()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("portcullis: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    super::quiet_logging();
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let db = match Database::connect_lazy(&config.database) {
            Ok(db) => db,
            Err(e) => {
                eprintln!("portcullis: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        // no migration: reading needs no more than a read-only role
        let code = match cmd {
            AuditCommand::Verify {
                json,
                from_seq,
                from_hash,
                ..
            } => {
                let after = from_seq
                    .zip(from_hash)
                    .map(|(seq, hash)| crate::audit::After { seq, hash });
                verify(&db, json, after.as_ref()).await
            }
            AuditCommand::List {
                action,
                actor,
                on,
                since,
                until,
                after_seq,
                limit,
                ..
            } => {
                let raw = RawFilter {
                    action,
                    actor,
                    target: on,
                    since,
                    until,
                    after_seq,
                    limit: None,
                };
                list(&db, raw, limit).await
            }
        };
        db.close().await;
        code
    })
}

/// A record hash as the chain writes it: 64 lowercase hex digits.
fn parse_hash(text: &str) -> Result<String, String> {
    if text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(text.to_owned())
    } else {
        Err("a record hash is 64 lowercase hex digits".to_owned())
    }
}

async fn verify(db: &Database, json: bool, after: Option<&crate::audit::After>) -> ExitCode {
    match crate::audit::verify_from(db, after).await {
        Err(e) => {
            eprintln!("portcullis: cannot read the audit trail: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
        Ok(Ok(intact)) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "intact": true,
                        "records": intact.records,
                        "legacy_records": intact.legacy,
                        "head_hash": intact.head_hash,
                        "after_seq": after.map(|a| a.seq),
                    })
                );
            } else {
                println!(
                    "{} records{}, chain intact (head {}{})",
                    intact.records,
                    after
                        .map(|a| format!(" after seq {}", a.seq))
                        .unwrap_or_default(),
                    intact.head_hash,
                    if intact.legacy > 0 {
                        format!(
                            "; {} older records predate the chain and are not covered",
                            intact.legacy
                        )
                    } else {
                        String::new()
                    }
                );
            }
            ExitCode::SUCCESS
        }
        Ok(Err(broken)) => {
            report_break(&broken, json);
            ExitCode::from(EXIT_CHAIN_BROKEN)
        }
    }
}

fn report_break(broken: &ChainBreak, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "intact": false,
                "first_broken_seq": broken.seq(),
                "reason": broken.to_string(),
            })
        );
    } else {
        println!("chain BROKEN: {broken}");
    }
}

async fn list(db: &Database, raw: RawFilter, cap: Option<u64>) -> ExitCode {
    let mut filter = match AuditFilter::parse(raw) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("portcullis: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    filter.limit = crate::audit::query::MAX_LIMIT;
    let mut left = cap.unwrap_or(u64::MAX);
    let mut out = std::io::stdout().lock();
    while left > 0 {
        let page = match crate::audit::list(db, &filter).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("portcullis: cannot read the audit trail: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        };
        for r in &page.records {
            if left == 0 {
                break;
            }
            left -= 1;
            let line = serde_json::to_string(r).unwrap_or_default();
            if writeln!(out, "{line}").is_err() {
                // the reader went away (`| head`): not an error
                return ExitCode::SUCCESS;
            }
        }
        match page.next_after_seq.and_then(|c| c.parse().ok()) {
            Some(next) => filter.after_seq = next,
            None => break,
        }
    }
    ExitCode::SUCCESS
}
