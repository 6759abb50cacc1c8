//! A test run without the services must fail with a message saying how to start them.

#[tokio::test]
async fn missing_postgres_fails_with_a_hint() {
    // Port 1 on loopback has no PostgreSQL.
    let err = outbox_testkit::try_connect("postgres://outbox@127.0.0.1:1/none")
        .await
        .expect_err("nothing listens on port 1");
    assert!(err.contains("scripts/services up"), "{err}");
    assert!(
        err.contains("127.0.0.1:1"),
        "the message names the address: {err}"
    );
}

#[test]
fn missing_kafka_fails_with_a_hint() {
    let err = outbox_testkit::try_kafka("127.0.0.1:1", std::time::Duration::from_secs(2))
        .expect_err("nothing listens on port 1");
    assert!(err.contains("scripts/services up"), "{err}");
}
