//! The worker's commands besides serving: `migrate`, `replay`, `erase`, `dlq`. Each
//! connects what it needs from the command line and prints what it did; the work itself
//! is the stages' (the write path, the store, the archive).
//!
//! - [`mod@replay`]: re-apply a window of the streams (or the archive) through the write path;
//! - [`mod@erase`]: a caller's data removed everywhere, with an entry that keeps it out;
//! - [`mod@dlq`]: dead letters listed and re-driven;
//! - [`mod@trace`]: where one call's record is.

pub mod dlq;
pub mod erase;
pub mod replay;
pub mod trace;

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use callcap::config::Role;
use callcap::shutdown::Shutdown;
use sqlx::PgPool;

use crate::config::{Cli, DlqCommand, EraseArgs, ReplayArgs, TraceArgs};
use crate::{archive, privacy, store};

fn pool(cli: &Cli) -> anyhow::Result<PgPool> {
    store::pool(&cli.db.database_url, cli.db.db_max_connections).context("parsing DATABASE_URL")
}

async fn admin_context(cli: &Cli, name: &str) -> anyhow::Result<jetstream::Context> {
    let client = cli
        .nats
        .connect_once(name, Role::Admin)
        .await
        .with_context(|| format!("connecting to NATS at {}", cli.nats.nats_url))?;
    Ok(jetstream::new(client))
}

/// `persist-worker migrate`.
///
/// # Errors
/// When Postgres stays unreachable or a migration fails.
pub async fn migrate(cli: &Cli) -> anyhow::Result<()> {
    crate::migrate(&cli.db.database_url, &pool(cli)?, Duration::from_secs(30)).await?;
    println!("migrations applied");
    Ok(())
}

/// `persist-worker replay`: prints the summary; fails when the replay did not apply all it
/// was asked (a script must not take it for whole).
///
/// # Errors
/// NATS, Postgres or the archive unavailable, erasures it cannot check, or a replay that
/// was interrupted, skipped an unreadable object or refused an entry.
pub async fn replay(cli: &Cli, args: &ReplayArgs, shutdown: &Shutdown) -> anyhow::Result<()> {
    let js = admin_context(cli, "persist-worker replay").await?;
    let policy = privacy::Policy::from_args(&cli.privacy)?;
    let pool = pool(cli)?;
    refuse_uncheckable(&pool, &policy, "replay").await?;
    let archive = if args.from_archive {
        Some(archive::Archive::from_args(&cli.archive)?.context(
            "--from-archive needs ARCHIVE_URL (s3://bucket[/prefix]) and the AWS_* variables",
        )?)
    } else {
        None
    };
    let summary = replay::run(
        &js,
        archive.as_ref(),
        &pool,
        &policy,
        args,
        cli.run.retry_max(),
        shutdown,
    )
    .await
    .map_err(|e| anyhow::anyhow!("replay failed: {e}"))?;
    println!("{summary}");
    anyhow::ensure!(
        summary.is_whole(),
        "the replay did not apply everything it was asked to (see the lines above)"
    );
    Ok(())
}

/// `persist-worker erase`.
///
/// # Errors
/// As [`erase::run`].
pub async fn erase(cli: &Cli, args: &EraseArgs) -> anyhow::Result<()> {
    let policy = privacy::Policy::from_args(&cli.privacy)?;
    let js = admin_context(cli, "persist-worker erase").await?;
    let pool = pool(cli)?;
    crate::migrate(&cli.db.database_url, &pool, Duration::from_secs(30)).await?;
    let mut out = std::io::stdout().lock();
    let archive = archive::Archive::from_args(&cli.archive)?;
    erase::run(&js, archive.as_ref(), &pool, &policy, args, &mut out)
        .await
        .map(|_| ())
}

/// `persist-worker dlq list | redrive`.
///
/// # Errors
/// Postgres unavailable, or erasures a redrive could not check.
pub async fn dlq(cli: &Cli, cmd: &DlqCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let pool = pool(cli)?;
    match cmd {
        DlqCommand::List { all, limit } => dlq::list(&pool, *all, *limit, &mut out).await,
        DlqCommand::Redrive { ids, all } => {
            let ids = (!*all).then_some(ids.as_slice());
            let policy = privacy::Policy::from_args(&cli.privacy)?;
            refuse_uncheckable(&pool, &policy, "dlq redrive").await?;
            dlq::redrive(&pool, &policy, ids, &mut out)
                .await
                .map(|_| ())
        }
    }
}

/// `persist-worker trace`: prints where the call is; exits 1 when it is nowhere.
///
/// # Errors
/// NATS, Postgres or the archive unavailable, or the record found nowhere.
pub async fn trace(cli: &Cli, args: &TraceArgs) -> anyhow::Result<()> {
    let js = admin_context(cli, "persist-worker trace").await?;
    let pool = pool(cli)?;
    let policy = privacy::Policy::from_args(&cli.privacy)?;
    let archive = archive::Archive::from_args(&cli.archive)?;
    let call = match (&args.external_call_id, args.call_history_id) {
        (_, Some(id)) => id,
        (Some(ext), None) => callcap::identity::external_call_history_id(
            args.company,
            args.external_system.as_deref(),
            ext,
        ),
        (None, None) => anyhow::bail!("give an EXTERNAL_CALL_ID or --call-history-id"),
    };
    let query = trace::Query {
        company: args.company,
        call,
        external_call_id: args.external_call_id.clone(),
        external_system: args.external_system.clone(),
    };
    let report = trace::run(&js, &pool, archive.as_ref(), policy.key.as_deref(), &query)
        .await
        .context("tracing the call")?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        trace::write_text(&report, &mut out)?;
    }
    out.flush()?;
    if !report.found() {
        std::process::exit(1);
    }
    Ok(())
}

/// Refuses to run `what` (a command that writes records) when it could not check them
/// against every erasure: it would have to hold records it has no place to hold.
///
/// # Errors
/// The reason, or Postgres unavailable.
async fn refuse_uncheckable(
    pool: &PgPool,
    policy: &privacy::Policy,
    what: &str,
) -> anyhow::Result<()> {
    if let Some(why) = store::privacy::key_state(pool, policy.key.as_deref())
        .await
        .context("reading the erasures")?
    {
        anyhow::bail!(
            "{what} cannot check records against every erasure ({why}): it would store erased data. \
             Give it the workers' ERASURE_KEY_FILE"
        );
    }
    Ok(())
}
