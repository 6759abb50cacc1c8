//! How the one-shot commands print: JSON (`--json`) or readable tables.

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("outboxd: cannot print JSON: {e}"),
    }
}

/// `migrate --status`: every migration this build knows, applied or pending, and any newer
/// one the schema records.
pub fn print_migrations(
    schema: &outbox::Schema,
    migrations: &[outbox::MigrationStatus],
    json: bool,
) {
    let known = |v: i32| v <= outbox::SCHEMA_VERSION;
    if json {
        let list: Vec<serde_json::Value> = migrations
            .iter()
            .map(|m| {
                serde_json::json!({
                    "version": m.version,
                    "name": m.name,
                    "applied_at": m.applied_at.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                    "pending": m.applied_at.is_none(),
                    "known_to_this_build": known(m.version),
                })
            })
            .collect();
        print_json(&serde_json::json!({ "schema": schema.name(), "migrations": list }));
        return;
    }
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::UTF8_FULL_CONDENSED)
        .set_header(vec!["version", "name", "applied"]);
    for m in migrations {
        let applied = match m.applied_at {
            Some(t) if known(m.version) => humantime::format_rfc3339_seconds(t).to_string(),
            Some(t) => format!(
                "{} (newer than this build)",
                humantime::format_rfc3339_seconds(t)
            ),
            None => "pending".to_owned(),
        };
        table.add_row(vec![m.version.to_string(), m.name.clone(), applied]);
    }
    let pending = migrations.iter().filter(|m| m.applied_at.is_none()).count();
    println!("schema {schema}: {pending} pending\n{table}");
}
