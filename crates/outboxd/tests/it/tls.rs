//! Production connectivity against the real TLS services of `scripts/services` (a PostgreSQL
//! cluster that accepts TCP sessions only over TLS, and Kafka's SSL and SASL_SSL listeners,
//! all with certificates of the script's own authority): messages are relayed over each
//! path; a wrong CA, a wrong password, a wrong host name and a plaintext attempt each fail
//! with an error naming the cause, never showing a secret; and nothing is lost once the
//! settings are fixed and the relay restarted.

use std::collections::HashMap;
use std::time::Duration;

use outbox::{Outbox, Schema};
use outboxd::connect::Database;
use outboxd::secrets::Secret;

use crate::support::{RelayProcess, RunningRelay, Setup};

const HINT: &str = "the TLS services are missing: run `scripts/services up` (it makes them) and \
                    `eval \"$(scripts/services env)\"`, or use scripts/test";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: {HINT}"))
}

/// A file of the script's TLS folder (certificates, keys, the generated passwords).
fn tls_file(name: &str) -> String {
    let path = format!("{}/{name}", env("OUTBOX_TLS_DIR"));
    assert!(
        std::path::Path::new(&path).is_file(),
        "{path} is missing: {HINT}"
    );
    path
}

fn file_secret(name: &str) -> String {
    std::fs::read_to_string(tls_file(name))
        .expect("read")
        .trim()
        .to_owned()
}

/// The TLS-only database's URL with `options` (`sslmode=...&...`).
fn tls_url(options: &str) -> String {
    format!("{}?{options}", env("OUTBOX_TLS_DATABASE_URL"))
}

fn verify_full() -> String {
    tls_url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        tls_file("ca.crt")
    ))
}

async fn connect(url: &str, password: Option<&str>) -> outboxd::Result<tokio_postgres::Client> {
    let secret = password.map(|p| Secret::new(p.to_owned()));
    Database::new(url, secret.as_ref())?.connect("test").await
}

async fn encrypted(client: &tokio_postgres::Client) -> bool {
    outboxd::connect::session_is_encrypted(client)
        .await
        .expect("pg_stat_ssl")
}

/// A migrated schema of this test's own in the TLS-only database, written through a
/// verify-full session.
async fn tls_schema(partitions: i32) -> (tokio_postgres::Client, Schema) {
    let client = connect(&verify_full(), Some(&file_secret("pg-password")))
        .await
        .unwrap_or_else(|e| panic!("connecting to the TLS-only database: {e} ({HINT})"));
    let schema = Schema::new(outbox_testkit::unique_name("tls")).expect("schema");
    outbox::migrate_schema(&client, &schema)
        .await
        .expect("migrate");
    client
        .execute(
            &format!("UPDATE {schema}.settings SET partition_count = $1"),
            &[&partitions],
        )
        .await
        .expect("partition count");
    (client, schema)
}

/// Saves `count` messages over four entities; returns the ids per entity in commit order.
async fn write(
    client: &mut tokio_postgres::Client,
    outbox: &Outbox,
    topic: &str,
    count: usize,
) -> HashMap<String, Vec<i64>> {
    let mut ids: HashMap<String, Vec<i64>> = HashMap::new();
    for i in 0..count {
        let entity = format!("entity-{}", i % 4);
        let tx = client.transaction().await.expect("begin");
        let message = outbox::Message::builder(topic, entity.as_str())
            .payload(format!("{i}").into_bytes())
            .build()
            .expect("valid");
        let id = outbox.save_in_tx(&tx, &message).await.expect("save");
        tx.commit().await.expect("commit");
        ids.entry(entity).or_default().push(id);
    }
    ids
}

fn assert_arrived(topic: &str, expected: &HashMap<String, Vec<i64>>) {
    let total = expected.values().map(Vec::len).sum();
    let consumed = outbox_testkit::consume(topic, total, Duration::from_secs(60));
    assert_eq!(consumed.len(), total, "every message of {topic} arrives");
    outbox_testkit::assert_dedup_order(&consumed, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_works_a_tls_only_database_through_verify_full_with_a_password_file() {
    let (mut client, schema) = tls_schema(2).await;
    let topic = outbox_testkit::create_topic("tls-pg", 3).await;
    let expected = write(&mut client, &Outbox::new(schema.clone()), &topic, 40).await;
    let relay = RunningRelay::start(outboxd::Config {
        database_url: verify_full(),
        database_password_file: tls_file("pg-password"),
        brokers: outbox_testkit::brokers(),
        schema: schema.name().to_owned(),
        ..outboxd::Config::default()
    });
    assert_arrived(&topic, &expected);
    // Every session the relay holds is encrypted (the server refuses any other, and says so).
    let sessions: Vec<bool> = client
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
              WHERE a.application_name LIKE 'outboxd%' AND a.datname = current_database()",
            &[],
        )
        .await
        .expect("sessions")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!sessions.is_empty(), "the relay's sessions are listed");
    assert!(sessions.iter().all(|ssl| *ssl), "{sessions:?}");
    relay.stop().await;
    outbox_testkit::drop_schema(&client, schema.name()).await;
}

#[tokio::test]
async fn every_sslmode_and_client_certificates_behave_as_libpq_says() {
    let password = file_secret("pg-password");
    let (ca, other_ca) = (tls_file("ca.crt"), tls_file("other-ca.crt"));
    let (cert, key) = (tls_file("client.crt"), tls_file("client.key"));

    // require and prefer: encrypted, the certificate unchecked (no root given).
    for mode in ["require", "prefer"] {
        let client = connect(&tls_url(&format!("sslmode={mode}")), Some(&password))
            .await
            .unwrap_or_else(|e| panic!("sslmode={mode}: {e}"));
        assert!(encrypted(&client).await, "sslmode={mode} encrypts");
    }
    // prefer against a server without TLS falls back to plaintext (the relay warns of it).
    let plain = connect(
        &format!("{}?sslmode=prefer", outbox_testkit::database_url()),
        None,
    )
    .await
    .expect("prefer without TLS");
    assert!(!encrypted(&plain).await, "the plain server offers no TLS");
    // verify-ca checks the chain but not the name; verify-full checks both.
    let other_name = |mode: &str, root: &str| {
        format!(
            "postgres://outbox@db.invalid:{}/outbox_tls?hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={root}",
            port()
        )
    };
    connect(&other_name("verify-ca", &ca), Some(&password))
        .await
        .expect("verify-ca ignores the host name");
    let e = connect(&other_name("verify-full", &ca), Some(&password))
        .await
        .expect_err("verify-full checks the host name");
    assert_cause(&e, "hostname mismatch", &password);
    // A certificate of another authority is refused in every checking mode.
    for mode in ["verify-ca", "verify-full", "require"] {
        let e = connect(
            &tls_url(&format!("sslmode={mode}&sslrootcert={other_ca}")),
            Some(&password),
        )
        .await
        .expect_err("wrong CA");
        assert_cause(&e, "certificate verify failed", &password);
    }
    // Plaintext is refused by the server, by name.
    let e = connect(&tls_url("sslmode=disable"), Some(&password))
        .await
        .expect_err("plaintext");
    assert_cause(&e, "no encryption", &password);
    // A wrong password.
    let e = connect(&verify_full(), Some("not-the-password-81"))
        .await
        .expect_err("wrong password");
    assert_cause(&e, "password authentication failed", "not-the-password-81");

    // Client certificates: the server maps the certificate's name to the user.
    let cert_url = |extra: &str| {
        format!(
            "postgres://outbox_cert@localhost:{}/outbox_tls?sslmode=verify-full&sslrootcert={ca}{extra}",
            port()
        )
    };
    let client = connect(&cert_url(&format!("&sslcert={cert}&sslkey={key}")), None)
        .await
        .expect("client certificate");
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("user")
        .get(0);
    assert_eq!(user, "outbox_cert");
    // An encrypted key with its passphrase (sslpassword) in a key=value string.
    let kv = format!(
        "host=localhost port={} dbname=outbox_tls user=outbox_cert sslmode=verify-full sslrootcert='{ca}' sslcert='{cert}' sslkey='{}' sslpassword='client-key-pass'",
        port(),
        tls_file("client-encrypted.key")
    );
    connect(&kv, None).await.expect("encrypted key");
    let e = connect(&cert_url(""), None)
        .await
        .expect_err("no certificate");
    assert_cause(&e, "requires a valid client certificate", "client-key-pass");
    let e = Database::new(&kv.replace("client-key-pass", "wrong-key-pass-82"), None)
        .expect_err("wrong key passphrase");
    assert_cause(
        &e,
        "an encrypted key needs sslpassword",
        "wrong-key-pass-82",
    );

    // Refused before any connection: settings that cannot be right.
    let e = Database::new(&tls_url("sslmode=verify-ca&sslrootcert=system"), None)
        .expect_err("system roots need verify-full");
    assert_cause(&e, "sslrootcert=system needs sslmode=verify-full", "");
    let e = Database::new(
        &tls_url("sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"),
        None,
    )
    .expect_err("missing CA file");
    assert_cause(&e, "cannot read sslrootcert /nonexistent/ca.pem", "");
    let e = Database::new(&tls_url(&format!("sslmode=require&sslcert={cert}")), None)
        .expect_err("a certificate without its key");
    assert_cause(&e, "sslcert and sslkey go together", "");
}

fn port() -> u16 {
    env("OUTBOX_TLS_DATABASE_URL")
        .parse::<tokio_postgres::Config>()
        .expect("url")
        .get_ports()[0]
}

/// The error names `cause` and never shows `secret`.
fn assert_cause(error: &outboxd::Error, cause: &str, secret: &str) {
    let text = format!("{error} {error:?}");
    assert!(text.contains(cause), "expected `{cause}` in: {text}");
    if !secret.is_empty() {
        assert!(!text.contains(secret), "the secret shows in: {text}");
    }
}

fn assert_no_secret(output: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !output.contains(secret),
            "a secret shows in the relay's output:\n{output}"
        );
    }
}

fn scratch_file(content: &str) -> String {
    let path = std::env::temp_dir().join(outbox_testkit::unique_name("tls-secret"));
    std::fs::write(&path, content).expect("write");
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_tls_failures_name_their_cause_and_lose_nothing_once_fixed() {
    let (mut client, schema) = tls_schema(2).await;
    let topic = outbox_testkit::create_topic("tls-pg-fix", 3).await;
    let expected = write(&mut client, &Outbox::new(schema.clone()), &topic, 20).await;
    let password = file_secret("pg-password");
    let wrong_password = "wrong-pg-password-83";
    let wrong_file = scratch_file(wrong_password);
    let common = |url: String, password_file: &str| {
        vec![
            format!("--database-url={url}"),
            format!("--database-password-file={password_file}"),
            format!("--brokers={}", outbox_testkit::brokers()),
            format!("--schema={}", schema.name()),
        ]
    };
    let right_file = tls_file("pg-password");
    let other_ca = tls_url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        tls_file("other-ca.crt")
    ));
    for (args, cause) in [
        (
            common(verify_full(), &wrong_file),
            "password authentication failed",
        ),
        (common(other_ca, &right_file), "certificate verify failed"),
        (
            common(tls_url("sslmode=disable"), &right_file),
            "no encryption",
        ),
    ] {
        let mut relay = RelayProcess::start(&args);
        relay.wait_for(cause, Duration::from_secs(30));
        let output = relay.stop();
        assert_no_secret(&output, &[&password, wrong_password]);
    }
    let waiting: i64 = client
        .query_one(&format!("SELECT count(*) FROM {schema}.message"), &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        waiting, 20,
        "nothing was retired while the relay could not connect"
    );

    let mut relay = RelayProcess::start(&common(verify_full(), &right_file));
    relay.wait_for("PostgreSQL sessions are encrypted", Duration::from_secs(30));
    assert_arrived(&topic, &expected);
    let output = relay.stop();
    assert_no_secret(&output, &[&password]);
    let _ = std::fs::remove_file(&wrong_file);
    outbox_testkit::drop_schema(&client, schema.name()).await;
}

/// The `[kafka]` settings of each secured path to the test broker.
fn kafka_paths() -> Vec<(&'static str, String, Vec<String>)> {
    let ca = tls_file("ca.crt");
    let mut paths = vec![(
        "SSL with a client certificate",
        env("OUTBOX_KAFKA_SSL_BROKERS"),
        vec![
            "security.protocol=ssl".to_owned(),
            format!("ssl.ca.location={ca}"),
            format!("ssl.certificate.location={}", tls_file("client.crt")),
            format!("ssl.key.location={}", tls_file("client.key")),
        ],
    )];
    for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] {
        paths.push((
            mechanism,
            env("OUTBOX_KAFKA_SASL_SSL_BROKERS"),
            vec![
                "security.protocol=sasl_ssl".to_owned(),
                format!("ssl.ca.location={ca}"),
                format!("sasl.mechanism={mechanism}"),
                "sasl.username=outbox".to_owned(),
            ],
        ));
    }
    paths
}

fn kafka_map(settings: &[String]) -> std::collections::BTreeMap<String, String> {
    settings
        .iter()
        .map(|s| {
            let (k, v) = s.split_once('=').expect("key=value");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_reach_kafka_over_ssl_and_over_sasl_ssl_with_each_mechanism() {
    for (name, brokers, settings) in kafka_paths() {
        let setup = Setup::new(2).await;
        let topic = outbox_testkit::create_topic("tls-kafka", 3).await;
        let mut client = outbox_testkit::connect().await;
        let expected = write(&mut client, &setup.outbox, &topic, 20).await;
        let relay = RunningRelay::start(outboxd::Config {
            brokers,
            kafka: kafka_map(&settings),
            kafka_sasl_password_file: if settings.iter().any(|s| s.starts_with("sasl.")) {
                tls_file("kafka-password")
            } else {
                String::new()
            },
            ..setup.relay_config()
        });
        let total = 20;
        let consumed = outbox_testkit::consume(&topic, total, Duration::from_secs(60));
        assert_eq!(consumed.len(), total, "{name}: every message arrives");
        outbox_testkit::assert_dedup_order(&consumed, &expected);
        relay.stop().await;
        setup.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_tls_and_sasl_failures_name_their_cause_and_lose_nothing_once_fixed() {
    let setup = Setup::new(2).await;
    let topic = outbox_testkit::create_topic("tls-kafka-fix", 3).await;
    let mut client = outbox_testkit::connect().await;
    let expected = write(&mut client, &setup.outbox, &topic, 20).await;
    let kafka_password = file_secret("kafka-password");
    let wrong_password = "wrong-kafka-password-84";
    let wrong_file = scratch_file(wrong_password);
    let right_file = tls_file("kafka-password");
    let paths = kafka_paths();
    let (_, ssl_brokers, ssl) = &paths[0];
    let (_, sasl_brokers, scram) = &paths[1];
    let args = |brokers: &str, settings: &[String], password_file: &str| {
        let mut args = vec![
            format!("--database-url={}", outbox_testkit::database_url()),
            format!("--brokers={brokers}"),
            format!("--schema={}", setup.schema.name()),
            "--shutdown-timeout-ms=1000".to_owned(),
        ];
        if !password_file.is_empty() {
            args.push(format!("--kafka-sasl-password-file={password_file}"));
        }
        for s in settings {
            args.push(format!("--kafka={s}"));
        }
        args
    };
    let other_ca: Vec<String> = ssl
        .iter()
        .map(|s| {
            if s.starts_with("ssl.ca.location=") {
                format!("ssl.ca.location={}", tls_file("other-ca.crt"))
            } else {
                s.clone()
            }
        })
        .collect();
    for (args, cause) in [
        (
            args(ssl_brokers, &other_ca, ""),
            "certificate verify failed",
        ),
        (
            args(sasl_brokers, scram, &wrong_file),
            "Authentication failed",
        ),
        // No security.protocol: plaintext to the TLS listener.
        (
            args(ssl_brokers, &[], ""),
            "its listener probably expects TLS",
        ),
    ] {
        let mut relay = RelayProcess::start(&args);
        relay.wait_for(cause, Duration::from_secs(60));
        let output = relay.stop();
        assert_no_secret(&output, &[&kafka_password, wrong_password]);
        assert_eq!(
            setup.remaining().await,
            20,
            "nothing was retired while Kafka refused ({cause})"
        );
    }
    let relay = RelayProcess::start(&args(sasl_brokers, scram, &right_file));
    assert_arrived(&topic, &expected);
    setup
        .wait_drained("the fixed relay retires everything")
        .await;
    let output = relay.stop();
    assert_no_secret(&output, &[&kafka_password]);
    let _ = std::fs::remove_file(&wrong_file);
    setup.cleanup().await;
}
