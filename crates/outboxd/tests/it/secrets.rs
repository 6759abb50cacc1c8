//! Secrets never show: every output of the `outboxd` binary (stdout and stderr) is searched
//! for the passwords it was given, through `check-config`, a relay that cannot reach its
//! database, a producer refused for its SASL settings, and `migrate` against a missing
//! database; and a password file that cannot be read is named in a clear error.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const URL_SECRET: &str = "url-s3cr3t-71";
const KV_SECRET: &str = "kv-s3cr3t-72";
const ENV_SECRET: &str = "env-s3cr3t-73";
const FILE_SECRET: &str = "file-s3cr3t-74";
const KAFKA_ENV_SECRET: &str = "kafka-env-s3cr3t-75";
const KAFKA_CONF_SECRET: &str = "kafka-conf-s3cr3t-76";
const ALL: &[&str] = &[
    URL_SECRET,
    KV_SECRET,
    ENV_SECRET,
    FILE_SECRET,
    KAFKA_ENV_SECRET,
    KAFKA_CONF_SECRET,
];

fn scratch(name: &str, content: &str) -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("{}-{name}", outbox_testkit::unique_name("secrets")));
    std::fs::write(&path, content).expect("write");
    path
}

/// Runs `outboxd args` with `env`, for at most `limit` (then SIGTERM); returns everything it
/// printed.
fn output_of(args: &[&str], env: &[(&str, &str)], limit: Duration) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outboxd"));
    cmd.args(args)
        .env_remove("OUTBOXD_DATABASE_URL")
        .env_remove("OUTBOXD_BROKERS")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn outboxd");
    let pid = child.id().to_string();
    let deadline = Instant::now() + limit;
    let watcher = std::thread::spawn(move || {
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
    });
    let out = child.wait_with_output().expect("output");
    drop(watcher);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_no_secret(what: &str, output: &str) {
    for secret in ALL {
        assert!(
            !output.contains(secret),
            "{what} printed a secret ({secret}):\n{output}"
        );
    }
}

#[test]
fn check_config_masks_every_secret() {
    let config = scratch(
        "relay.toml",
        &format!(
            "[kafka]\n\"ssl.key.password\" = \"{KAFKA_CONF_SECRET}\"\n\"sasl.username\" = \"relay\"\n"
        ),
    );
    let pw_file = scratch("pw", &format!("{FILE_SECRET}\n"));
    let config_path = config.to_str().expect("utf-8");
    let env = [
        ("OUTBOXD_DATABASE_PASSWORD", ENV_SECRET),
        ("OUTBOXD_KAFKA_SASL_PASSWORD", KAFKA_ENV_SECRET),
    ];
    for url in [
        format!("postgres://relay:{URL_SECRET}@127.0.0.1:1/app"),
        format!("host=127.0.0.1 port=1 user=relay password={KV_SECRET} dbname=app"),
    ] {
        let out = output_of(
            &[
                "check-config",
                "--config",
                config_path,
                "--database-url",
                &url,
                "--brokers",
                "127.0.0.1:1",
                "--database-password-file",
                pw_file.to_str().expect("utf-8"),
            ],
            &env,
            Duration::from_secs(20),
        );
        assert!(out.contains("***"), "the masks show: {out}");
        assert!(
            out.contains("REDACTED"),
            "the environment's secrets show as such: {out}"
        );
        assert_no_secret("check-config", &out);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_never_print_a_secret() {
    let setup = crate::support::Setup::new(1).await;
    let pw_file = scratch("pw", FILE_SECRET);
    // A relay whose database cannot be reached waits and reports; then SIGTERM.
    let out = output_of(
        &[
            "run",
            "--database-url",
            &format!("postgres://relay:{URL_SECRET}@127.0.0.1:1/app"),
            "--brokers",
            "127.0.0.1:1",
            "--database-password-file",
            pw_file.to_str().expect("utf-8"),
        ],
        &[("OUTBOXD_KAFKA_SASL_PASSWORD", KAFKA_ENV_SECRET)],
        Duration::from_secs(4),
    );
    assert!(
        out.contains("PostgreSQL"),
        "it said what it waits for: {out}"
    );
    assert_no_secret("a relay that cannot reach its database", &out);

    // A producer librdkafka refuses for its SASL settings.
    let config = scratch(
        "sasl.toml",
        "[kafka]\n\"security.protocol\" = \"sasl_plaintext\"\n\"sasl.mechanism\" = \"SCRAM-SHA-256\"\n\"sasl.username\" = \"relay\"\n",
    );
    let out = output_of(
        &[
            "run",
            "--config",
            config.to_str().expect("utf-8"),
            "--database-url",
            &outbox_testkit::database_url(),
            "--brokers",
            &outbox_testkit::brokers(),
            "--schema",
            setup.schema.name(),
        ],
        &[
            ("OUTBOXD_KAFKA_SASL_PASSWORD", KAFKA_ENV_SECRET),
            ("OUTBOXD_DATABASE_PASSWORD", ENV_SECRET),
        ],
        Duration::from_secs(10),
    );
    assert!(
        out.contains("SASL") || out.contains("sasl"),
        "it named the cause: {out}"
    );
    assert_no_secret("a relay whose producer is refused", &out);

    // migrate against a database that does not exist.
    let out = output_of(
        &[
            "migrate",
            "--database-url",
            &format!(
                "host=127.0.0.1 port=55432 user=outbox password={KV_SECRET} dbname=no_such_db"
            ),
        ],
        &[("OUTBOXD_DATABASE_PASSWORD", ENV_SECRET)],
        Duration::from_secs(10),
    );
    assert!(out.contains("no_such_db"), "it named the database: {out}");
    assert_no_secret("migrate against a missing database", &out);
    setup.cleanup().await;
}

#[test]
fn an_unreadable_password_file_is_named_in_a_clear_error() {
    let missing = std::env::temp_dir().join(outbox_testkit::unique_name("no-such-secret"));
    let out = output_of(
        &[
            "migrate",
            "--database-url",
            "postgres://relay@127.0.0.1:55432/outbox_test",
            "--database-password-file",
            missing.to_str().expect("utf-8"),
        ],
        &[],
        Duration::from_secs(10),
    );
    assert!(
        out.contains(missing.to_str().expect("utf-8")) && out.contains("database password"),
        "{out}"
    );
}
