//! One DNS query in, what to do with it out. Pure: messages are read and written with
//! `hickory-proto`; nothing here does I/O.
//!
//! A standard query (one question, class IN) for a name of the [`NameTable`] is answered here:
//! A with the name's IPv4 addresses, AAAA with its IPv6 ones, and an empty answer with
//! `NOERROR` (NODATA) for a type the name has no address of (AAAA of a name with only a VIP,
//! MX, TXT, ...), as Istio's proxy does: the name exists, the client must not conclude
//! otherwise. Everything else (other names, other opcodes, several questions, a message that
//! does not parse) is forwarded byte for byte, so that what the upstream resolver says reaches
//! the application unchanged.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};

use crate::table::NameTable;

/// How long a client may cache a mesh answer (Istio's proxy uses the same).
pub const MESH_TTL: u32 = 30;

/// The most a UDP answer may hold without EDNS (RFC 1035).
const UDP_PLAIN_MAX: usize = 512;

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send this answer back.
    Answer(Vec<u8>),
    /// Relay the query to an upstream resolver.
    Forward,
}

/// Decides what to do with `query` (the DNS message as received), over UDP when `udp` (the
/// answer is then truncated, with TC set, beyond what the client can take).
pub fn decide(query: &[u8], table: &NameTable, udp: bool) -> Decision {
    let Ok(request) = Message::from_vec(query) else {
        return Decision::Forward;
    };
    let meta = &request.metadata;
    if meta.message_type != MessageType::Query
        || meta.op_code != OpCode::Query
        || request.queries.len() != 1
    {
        return Decision::Forward;
    }
    let question = &request.queries[0];
    if question.query_class() != DNSClass::IN {
        return Decision::Forward;
    }
    let name = question.name().to_ascii();
    let Some(addresses) = table.lookup(&name) else {
        return Decision::Forward;
    };
    let ips: Vec<IpAddr> = match question.query_type() {
        RecordType::A => addresses.v4.iter().copied().map(IpAddr::V4).collect(),
        RecordType::AAAA => addresses.v6.iter().copied().map(IpAddr::V6).collect(),
        _ => Vec::new(),
    };
    let mut response = Message::response(meta.id, OpCode::Query);
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = meta.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.checking_disabled = meta.checking_disabled;
    response.metadata.response_code = ResponseCode::NoError;
    response.add_query(question.clone());
    for ip in ips {
        response.add_answer(Record::from_rdata(
            question.name().clone(),
            MESH_TTL,
            RData::from(ip),
        ));
    }
    let mut limit = UDP_PLAIN_MAX;
    if let Some(edns) = &request.edns {
        // A client that speaks EDNS gets an OPT record back (RFC 6891).
        let mut ours = Edns::new();
        ours.set_max_payload(edns.max_payload().max(512));
        limit = usize::from(edns.max_payload().max(512));
        response.set_edns(ours);
    }
    let Ok(mut bytes) = response.to_vec() else {
        return Decision::Forward;
    };
    if udp && bytes.len() > limit {
        match response.truncate().to_vec() {
            Ok(truncated) => bytes = truncated,
            Err(_) => return Decision::Forward,
        }
    }
    Decision::Answer(bytes)
}

/// A SERVFAIL answer to `query` (no upstream answered), or `None` when the query is not a
/// message one could answer.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut response = Message::error_msg(
        request.metadata.id,
        request.metadata.op_code,
        ResponseCode::ServFail,
    );
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.add_queries(request.queries);
    response.to_vec().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn table() -> NameTable {
        let mut b = NameTable::builder("backend");
        b.host("reviews.backend.svc", ["240.240.1.1".parse().unwrap()])
            .host(
                "dual.example.com",
                ["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
            );
        b.build()
    }

    fn query(name: &str, rtype: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0x4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        if edns {
            m.set_edns(Edns::new());
        }
        m.to_vec().unwrap()
    }

    fn answer(d: Decision) -> Message {
        match d {
            Decision::Answer(bytes) => Message::from_vec(&bytes).unwrap(),
            Decision::Forward => panic!("forwarded"),
        }
    }

    #[test]
    fn mesh_names_are_answered_and_the_rest_forwarded() {
        let t = table();
        // (name, type, answered here, addresses in the answer)
        #[rustfmt::skip]
        let cases: &[(&str, RecordType, bool, &[&str])] = &[
            ("reviews.backend.svc.", RecordType::A, true, &["240.240.1.1"]),
            ("Reviews.Backend.svc", RecordType::A, true, &["240.240.1.1"]),
            ("reviews", RecordType::A, true, &["240.240.1.1"]),
            // NODATA, not NXDOMAIN: the name exists, with IPv4 only.
            ("reviews.backend.svc.", RecordType::AAAA, true, &[]),
            ("reviews.backend.svc.", RecordType::MX, true, &[]),
            ("dual.example.com.", RecordType::AAAA, true, &["2001:db8::1"]),
            ("dual.example.com.", RecordType::A, true, &["192.0.2.1"]),
            ("example.com.", RecordType::A, false, &[]),
            ("reviews.backend.svc.cluster.local.", RecordType::A, false, &[]),
        ];
        for edns in [false, true] {
            for (name, rtype, here, want) in cases {
                let d = decide(&query(name, *rtype, edns), &t, true);
                if !here {
                    assert_eq!(d, Decision::Forward, "{name} {rtype}");
                    continue;
                }
                let m = answer(d);
                assert_eq!(m.metadata.id, 0x4242);
                assert_eq!(m.metadata.message_type, MessageType::Response);
                assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
                assert!(m.metadata.recursion_desired && m.metadata.authoritative);
                assert_eq!(m.queries.len(), 1);
                assert_eq!(m.edns.is_some(), edns);
                let got: Vec<String> = m
                    .answers
                    .iter()
                    .map(|r| {
                        assert_eq!(r.ttl, MESH_TTL);
                        assert_eq!(
                            r.name.to_ascii().to_lowercase(),
                            name.to_lowercase().trim_end_matches('.').to_owned() + "."
                        );
                        match &r.data {
                            RData::A(a) => a.0.to_string(),
                            RData::AAAA(a) => a.0.to_string(),
                            other => panic!("{other:?}"),
                        }
                    })
                    .collect();
                assert_eq!(got, *want, "{name} {rtype}");
            }
        }
    }

    #[test]
    fn what_is_not_a_plain_query_is_forwarded() {
        let t = table();
        let mut two = Message::query();
        for n in ["reviews.backend.svc.", "dual.example.com."] {
            two.add_query(Query::query(Name::from_ascii(n).unwrap(), RecordType::A));
        }
        let mut chaos = Message::query();
        let mut q = Query::query(Name::from_ascii("reviews.").unwrap(), RecordType::TXT);
        q.set_query_class(DNSClass::CH);
        chaos.add_query(q);
        for bytes in [
            two.to_vec().unwrap(),
            chaos.to_vec().unwrap(),
            vec![],
            vec![0xff; 7],
            b"not dns at all, not even close".to_vec(),
        ] {
            assert_eq!(decide(&bytes, &t, true), Decision::Forward);
        }
    }

    #[test]
    fn servfail_keeps_the_id_and_question() {
        let q = query("example.com.", RecordType::A, false);
        let m = Message::from_vec(&servfail(&q).unwrap()).unwrap();
        assert_eq!(m.metadata.id, 0x4242);
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(m.queries.len(), 1);
        assert!(servfail(b"\x00").is_none());
    }
}
