//! librdkafka's own log lines, forwarded to the relay's tracing subscriber, with the cause
//! spelled out where librdkafka's words leave an operator guessing: a plaintext client at a
//! TLS listener only reads "Disconnected ... in state APIVERSION_QUERY".

use rdkafka::config::RDKafkaLogLevel;

/// Forwards one librdkafka log line; `plaintext` says the client speaks neither TLS nor SASL.
pub fn forward(level: RDKafkaLogLevel, facility: &str, message: &str, plaintext: bool) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
        RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
        RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
    }
    if let Some(hint) = hint(facility, message, plaintext) {
        tracing::error!("{hint}");
    }
}

/// The cause behind a log line, when librdkafka's words do not name it.
fn hint(facility: &str, message: &str, plaintext: bool) -> Option<&'static str> {
    // A TLS listener closes a connection whose first bytes are not a TLS handshake; the
    // client sees the close while it waits for the answer to its first request.
    (plaintext
        && facility == "FAIL"
        && message.contains("Disconnected")
        && message.contains("APIVERSION_QUERY"))
    .then_some(
        "a Kafka broker closed the connection at the relay's first request: its listener \
         probably expects TLS, and the relay speaks plaintext; set [kafka] \
         security.protocol = \"ssl\" or \"sasl_ssl\" (docs/security.md)",
    )
}

#[cfg(test)]
mod tests {
    use super::hint;

    #[test]
    fn a_plaintext_client_closed_at_its_first_request_is_told_about_tls() {
        let line = "127.0.0.1:39094/bootstrap: Disconnected: connection closed by peer: receive 0 after POLLIN (after 3ms in state APIVERSION_QUERY)";
        assert!(hint("FAIL", line, true).is_some_and(|h| h.contains("expects TLS")));
        assert_eq!(
            hint("FAIL", line, false),
            None,
            "not when TLS is configured"
        );
        assert_eq!(
            hint(
                "FAIL",
                "127.0.0.1:9092/1: Disconnected (after 5012ms in state UP)",
                true
            ),
            None,
            "not for a broker that went away later"
        );
    }
}
