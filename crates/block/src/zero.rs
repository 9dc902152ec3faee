//! All-zero detection. Every written block passes through this, so it must run near memory
//! bandwidth: three sampled bytes reject most data at once (QEMU's `buffer_is_zero` idea), then
//! a wide OR-reduction that the compiler vectorises checks the rest in 128-byte strides.

/// True when every byte of `buf` is zero (an empty buffer is zero).
pub fn is_zero(buf: &[u8]) -> bool {
    let n = buf.len();
    if n == 0 {
        return true;
    }
    if buf[0] | buf[n / 2] | buf[n - 1] != 0 {
        return false;
    }
    // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets the aligned middle.
    let (head, body, tail) = unsafe { buf.align_to::<u128>() };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && body
            .chunks(8)
            .all(|c| c.iter().fold(0u128, |acc, &w| acc | w) == 0)
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zero_buffers() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0]));
        assert!(is_zero(&vec![0u8; 4096]));
        // Odd lengths and misaligned starts exercise the head and tail paths.
        let v = vec![0u8; 4099];
        assert!(is_zero(&v[1..]));
        assert!(is_zero(&v[3..4000]));
    }

    #[test]
    fn any_nonzero_byte_is_found() {
        // Every position of a 4 KiB buffer, from a misaligned start too: the sampled bytes,
        // their neighbours (n-2, the E2B regression) and every stride of the vector loop.
        for start in [0usize, 1, 7] {
            let mut v = vec![0u8; 4096 + start];
            for i in start..v.len() {
                v[i] = 0x80;
                assert!(
                    !is_zero(&v[start..]),
                    "missed byte {} from {}",
                    i - start,
                    start
                );
                v[i] = 0;
            }
        }
        assert!(!is_zero(&[0, 1, 0]));
    }
}
