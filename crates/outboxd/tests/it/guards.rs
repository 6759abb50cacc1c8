//! The relay refuses to start on an id sequence that would break per-entity order or
//! de-duplication by `outbox-id`: cached (a later commit can get a smaller id), cycling, or
//! set back below ids already used.

use crate::support::{Setup, write_messages};

async fn refusal(setup: &Setup) -> String {
    let err = outboxd::relay::run(setup.relay_config(), std::future::pending())
        .await
        .expect_err("the relay must refuse to start");
    err.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_or_cycling_id_sequence_is_refused() {
    let setup = Setup::new(1).await;
    let seq = format!("{}.message_id_seq", setup.schema);
    setup
        .client
        .batch_execute(&format!("ALTER SEQUENCE {seq} CACHE 20 CYCLE"))
        .await
        .expect("alter");
    let text = refusal(&setup).await;
    assert!(
        text.contains("CACHE 20") && text.contains("cycles"),
        "{text}"
    );
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_sequence_set_back_below_used_ids_is_refused() {
    let setup = Setup::new(2).await;
    write_messages(
        &setup.outbox,
        "t",
        &(0..5)
            .map(|i| (format!("e{i}"), b"x".to_vec()))
            .collect::<Vec<_>>(),
    )
    .await;
    let seq = format!("{}.message_id_seq", setup.schema);
    setup
        .client
        .batch_execute(&format!("SELECT setval('{seq}', 2)"))
        .await
        .expect("setval");
    let text = refusal(&setup).await;
    assert!(text.contains("set back") && text.contains("id 5"), "{text}");
    setup.cleanup().await;
}
