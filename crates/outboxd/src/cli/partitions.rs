//! `outboxd partitions`: the command line of `outboxd::partitions` (resize with progress,
//! pause, resume), as text or JSON.

use clap::Subcommand;
use outboxd::{Config, Error};

use super::output::print_json;

/// What `outboxd partitions` does.
#[derive(Debug, Subcommand)]
pub enum PartitionAction {
    /// Change the number of virtual partitions (new entities spread over the new count;
    /// existing ones keep theirs while messages wait).
    Resize {
        /// The new count.
        count: i32,
        /// Wait, showing progress, until the partitions at or above the new count are drained
        /// and no entity is mapped there any more.
        #[arg(long)]
        wait: bool,
    },
    /// Stop relaying one partition on purpose (its messages wait; the others flow).
    Pause {
        /// The partition.
        partition: i32,
        /// Why, shown by `outboxd status`.
        #[arg(long, default_value = "paused by an operator")]
        reason: String,
    },
    /// Relay a paused partition again.
    Resume {
        /// The partition.
        partition: i32,
    },
}

/// Runs a `partitions` command.
pub async fn run(config: &mut Config, action: PartitionAction, json: bool) -> Result<(), Error> {
    use outboxd::partitions as parts;
    let client = crate::connect_db(config).await?;
    let schema = config.schema()?;
    match action {
        PartitionAction::Resize { count, wait } => {
            let old = parts::resize(&client, &schema, count).await?;
            if !json {
                println!("partition count {old} -> {count}");
            }
            if wait {
                let mut last = None;
                loop {
                    let left = parts::above_count(&client, &schema).await?;
                    if last.as_ref() != Some(&left) {
                        if json {
                            print_json(&left);
                        } else {
                            println!(
                                "above the count: {} messages waiting in {} partition(s), {} entities still mapped",
                                left.waiting,
                                left.partitions.len(),
                                left.mapped_entities
                            );
                        }
                    }
                    if left.waiting == 0 && left.mapped_entities == 0 {
                        break;
                    }
                    last = Some(left);
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
            if json && !wait {
                print_json(&serde_json::json!({ "from": old, "to": count }));
            } else if wait && !json {
                println!("done: every entity is mapped below {count}");
            }
        }
        PartitionAction::Pause { partition, reason } => {
            parts::pause(&client, &schema, partition, &reason).await?;
            if json {
                print_json(&serde_json::json!({ "paused": partition }));
            } else {
                println!("partition {partition} paused: its owner stops after its current batch");
            }
        }
        PartitionAction::Resume { partition } => {
            parts::resume(&client, &schema, partition).await?;
            if json {
                print_json(&serde_json::json!({ "resumed": partition }));
            } else {
                println!("partition {partition} resumed");
            }
        }
    }
    Ok(())
}
