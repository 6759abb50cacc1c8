//! W3C Trace Context (`traceparent`), checked before a message stores it: a consumer that
//! continues the writer's trace from the Kafka header must get a well-formed one.

/// True when `value` is a W3C `traceparent` of version 00: `00-<32 hex>-<16 hex>-<2 hex>`,
/// lowercase, with neither id all zeros.
pub fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    matches!(parts.as_slice(), [version, trace, parent, flags]
        if *version == "00" && hex(trace, 32) && nonzero(trace)
            && hex(parent, 16) && nonzero(parent) && hex(flags, 2))
}

#[cfg(test)]
mod tests {
    use super::is_traceparent;

    #[test]
    fn only_well_formed_traceparents_pass() {
        assert!(is_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(!is_traceparent(bad), "{bad:?}");
        }
    }
}

#[cfg(test)]
mod builder_tests {
    use crate::{Error, Message};

    #[test]
    fn the_builder_stores_a_trace_context_as_headers_and_refuses_a_bad_one() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let m = Message::builder("orders", "order-1")
            .trace_context(parent, Some("vendor=x"))
            .build()
            .expect("valid");
        let headers: Vec<(&str, &[u8])> = m.headers().collect();
        assert_eq!(
            headers,
            vec![
                ("traceparent", parent.as_bytes()),
                ("tracestate", &b"vendor=x"[..])
            ]
        );
        let e = Message::builder("orders", "order-1")
            .trace_context("not-a-trace", None)
            .build()
            .expect_err("malformed");
        assert!(
            matches!(e, Error::InvalidTraceparent(ref v) if v == "not-a-trace"),
            "{e}"
        );
    }
}
