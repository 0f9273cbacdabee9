//! Integer formatting that stays within what this machine's instruction emulator
//! executes. `core`'s `Display` for integers uses SSE shuffles for numbers >= 10000,
//! which the emulator refuses; [`Dec`] prints digits with plain integer code.

use core::fmt;

/// Prints an unsigned integer in decimal: `println!("{}", Dec(n))`.
#[derive(Clone, Copy, Debug)]
pub struct Dec(pub u64);

impl fmt::Display for Dec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        let mut n = self.0;
        loop {
            i -= 1;
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        match core::str::from_utf8(&buf[i..]) {
            Ok(s) => f.write_str(s),
            Err(_) => Err(fmt::Error),
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::Dec;
    use std::format;

    #[test]
    fn prints_like_core() {
        for n in [0u64, 7, 10, 9999, 10000, 123456789, u64::MAX] {
            assert_eq!(format!("{}", Dec(n)), format!("{n}"));
        }
    }
}
