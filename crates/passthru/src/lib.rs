//! passthru as a library: the command line's pieces (`run`, `bench`, `device`), so
//! tests and embedding programs reach the same parsers and runners as the binary.

pub mod acpi_dump;
pub mod bench;
pub mod control;
pub mod ctl;
pub mod device;
pub mod memlock;
pub mod plot;
pub mod progress;
pub mod replay;
pub mod run;
pub mod sandbox;
pub mod signals;

/// Parses a memory size: bytes (decimal or `0x` hexadecimal), or a number with a K, M
/// or G suffix (powers of 1024) — the control API's numbers.
pub fn parse_size(s: &str) -> Result<u64, String> {
    api::command::parse_number(s)
        .ok_or_else(|| format!("'{s}' is not a size; write e.g. 256M, 1G or 33554432 (below 16 EiB)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("1T").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }
}
