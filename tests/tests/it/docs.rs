//! The README's configuration table is a promise an operator acts on at 3 a.m.: every
//! variable it lists exists, with the default it states, and every variable the binaries
//! read is listed. Read from both binaries' own clap definitions, so a changed default
//! fails here rather than in production.

use std::collections::BTreeMap;
use std::path::Path;

use clap::CommandFactory;

/// Every environment variable `command` and its subcommands read, with clap's default
/// (values joined by `,`; `None` when there is none).
fn env_defaults(command: &clap::Command, into: &mut BTreeMap<String, Option<String>>) {
    for arg in command.get_arguments() {
        let Some(env) = arg.get_env() else { continue };
        let default: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        // A switch (`--no-migrate`) is off unless given.
        let default = match arg.get_action() {
            clap::ArgAction::SetTrue => Some("false".to_string()),
            _ => (!default.is_empty()).then(|| default.join(",")),
        };
        let name = env.to_string_lossy().into_owned();
        if let Some(seen) = into.get(&name) {
            assert_eq!(
                seen, &default,
                "{name} has two different defaults in the binaries' flags"
            );
        }
        into.insert(name, default);
    }
    for sub in command.get_subcommands() {
        env_defaults(sub, into);
    }
}

/// A README default as clap would write it: `—`/`unset` is none; words in brackets are
/// commentary; `10 GiB`, `8 MiB` are bytes; `false` stays `false`.
fn normalise(cell: &str) -> Option<String> {
    let cell = cell.trim();
    let cell = match cell.find(" (") {
        Some(at) => &cell[..at],
        None => cell,
    };
    let cell = cell.trim().trim_matches('`');
    if cell == "—" || cell == "unset" || cell.is_empty() {
        return None;
    }
    let units = [("KiB", 1u64 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30)];
    for (unit, scale) in units {
        if let Some(n) = cell.strip_suffix(unit) {
            let n: u64 = n.trim().parse().expect("a number before the unit");
            return Some((n * scale).to_string());
        }
    }
    Some(cell.to_string())
}

/// The README's `## Configuration` table: variable → default as written.
fn readme_table() -> BTreeMap<String, Option<String>> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let section = readme
        .split("\n## Configuration\n")
        .nth(1)
        .expect("the README has a Configuration section");
    let section = section.split("\n## ").next().unwrap();
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (vars, defaults) = (cells[1], cells[2]);
        let vars: Vec<&str> = vars.split(" / ").map(|v| v.trim_matches('`')).collect();
        // `— / — / 30` gives each its own; a single `—` is every one's.
        let defaults: Vec<&str> = match defaults.split(" / ").collect::<Vec<_>>() {
            one if one.len() == 1 => vec![one[0]; vars.len()],
            each => each,
        };
        assert_eq!(
            vars.len(),
            defaults.len(),
            "README row {line:?}: one default per variable"
        );
        for (var, default) in vars.into_iter().zip(defaults) {
            rows.insert(var.to_string(), normalise(default));
        }
    }
    rows
}

/// Variables read by libraries rather than our flags (the AWS SDK's, the log filter's),
/// named in the table's prose, not as rows of their own.
const READ_ELSEWHERE: &[&str] = &[
    "RUST_LOG",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ALLOW_HTTP",
];

#[test]
fn the_readme_configuration_table_matches_the_binaries_flags() {
    let mut flags = BTreeMap::new();
    env_defaults(&ingest_gateway::config::Cli::command(), &mut flags);
    env_defaults(&persist_worker::config::Cli::command(), &mut flags);
    let readme = readme_table();
    assert!(
        readme.len() > 40,
        "the table was read: {} rows",
        readme.len()
    );

    let mut wrong = Vec::new();
    for (var, default) in &readme {
        match flags.get(var) {
            None => wrong.push(format!("{var}: in the README, read by no flag")),
            Some(flag) if flag != default => wrong.push(format!(
                "{var}: README says {default:?}, the flag's default is {flag:?}"
            )),
            Some(_) => {}
        }
    }
    for var in flags.keys() {
        if !readme.contains_key(var) && !READ_ELSEWHERE.contains(&var.as_str()) {
            wrong.push(format!(
                "{var}: read by a flag, missing from the README table"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "README configuration table:\n{}",
        wrong.join("\n")
    );
}
