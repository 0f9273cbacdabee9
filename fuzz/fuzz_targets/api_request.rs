//! Fuzzes the control API's request path: arbitrary bytes framed as HTTP requests
//! (pipelined, as a client connection delivers them), each decoded into a command;
//! and the same bytes as an answer for the `ctl` client. Nothing may panic, and a
//! complete request never claims more bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(api::http::Parsed::Complete(req, used)) = api::http::parse_request(rest) {
        assert!(used > 0 && used <= rest.len());
        let _ = api::decode(&req.method, &req.path, &req.body);
        rest = &rest[used..];
    }
    let _ = api::client::parse_answer(data);
});
