//! `outboxd dead-letters`: the command line of `outboxd::dead_letters` (list, show, retry,
//! drop), as tables or JSON.

use clap::Subcommand;
use outboxd::{Config, Error};

use super::output::print_json;

/// What `outboxd dead-letters` does.
#[derive(Debug, Subcommand)]
pub enum DeadLetterAction {
    /// List dead letters, oldest first.
    List {
        /// Only this topic.
        #[arg(long)]
        topic: Option<String>,
        /// Only this entity.
        #[arg(long)]
        entity: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Show one dead letter in full (payload, headers, error).
    Show {
        /// The message id.
        id: i64,
    },
    /// Put a message back in order for its entity (one that parked its entity: it goes
    /// ahead of the entity's held-back messages, and the entity is released); a message that
    /// was overtaken is refused, with the reason.
    Retry {
        /// The message id.
        id: i64,
    },
    /// Delete a dead letter for good (refused while its entity is parked on it).
    Drop {
        /// The message id.
        id: i64,
    },
}

/// Runs a `dead-letters` command.
pub async fn run(config: &mut Config, action: DeadLetterAction, json: bool) -> Result<(), Error> {
    use outboxd::dead_letters as dl;
    let mut client = crate::connect_db(config).await?;
    let schema = config.schema()?;
    match action {
        DeadLetterAction::List {
            topic,
            entity,
            limit,
        } => {
            let filter = dl::Filter {
                topic,
                entity_key: entity,
                limit,
            };
            let found = dl::list(&client, &schema, &filter).await?;
            if json {
                print_json(&found);
            } else {
                let mut table = comfy_table::Table::new();
                table
                    .load_preset(comfy_table::presets::UTF8_FULL_CONDENSED)
                    .set_header(vec![
                        "id",
                        "partition",
                        "topic",
                        "entity",
                        "policy",
                        "failed at",
                        "error",
                    ]);
                for d in &found {
                    let policy = if d.parks_its_entity {
                        format!("{} (entity parked)", d.policy)
                    } else {
                        d.policy.clone()
                    };
                    table.add_row(vec![
                        d.id.to_string(),
                        d.partition.to_string(),
                        d.topic.clone(),
                        d.entity_key.clone(),
                        policy,
                        d.failed_at.clone(),
                        d.error.clone(),
                    ]);
                }
                println!("{} dead letter(s)\n{table}", found.len());
            }
        }
        DeadLetterAction::Show { id } => {
            let detail = dl::show(&client, &schema, id).await?;
            if json {
                print_json(&detail);
            } else {
                let text = toml::to_string(&detail).map_err(|e| {
                    Error::Config(vec![format!("cannot print the dead letter: {e}")])
                })?;
                print!("{text}");
            }
        }
        DeadLetterAction::Retry { id } => {
            let partition = dl::retry(&mut client, &schema, id).await?;
            if json {
                print_json(&serde_json::json!({ "retried": id, "partition": partition }));
            } else {
                println!(
                    "message {id} is back in partition {partition}, ahead of its entity's held-back messages; the entity is released"
                );
            }
        }
        DeadLetterAction::Drop { id } => {
            dl::drop_message(&client, &schema, id).await?;
            if json {
                print_json(&serde_json::json!({ "dropped": id }));
            } else {
                println!("dead letter {id} dropped");
            }
        }
    }
    Ok(())
}
