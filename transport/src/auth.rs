//! Pre-shared-key authentication: HMAC-SHA256 over the handshake transcript, in both directions,
//! with distinct labels so that a proof can never be reflected back to its sender.

use hmac::{Mac, SimpleHmac};
use sha2::Sha256;

use crate::error::{Result, TransportError};
use crate::wire::{NONCE_LEN, PROOF_LEN};

type HmacSha256 = SimpleHmac<Sha256>;

/// Shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;
/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

const SERVER_LABEL: &[u8] = b"ferry/1 server proof";
const CLIENT_LABEL: &[u8] = b"ferry/1 client proof";

/// A secret both hosts of a migration hold. Its bytes never appear in `Debug` output.
#[derive(Clone)]
pub struct PreSharedKey(Vec<u8>);

impl PreSharedKey {
    /// A key of `bytes`; fails if it is shorter than [`MIN_KEY_LEN`] or longer than [`MAX_KEY_LEN`].
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self> {
        let bytes = bytes.into();
        if bytes.len() < MIN_KEY_LEN {
            return Err(TransportError::InvalidKey("shorter than 16 bytes"));
        }
        if bytes.len() > MAX_KEY_LEN {
            return Err(TransportError::InvalidKey("longer than 1024 bytes"));
        }
        Ok(PreSharedKey(bytes))
    }

    /// 32 random bytes from the OS.
    pub fn generate() -> Result<Self> {
        Ok(PreSharedKey(random_bytes::<32>()?.to_vec()))
    }

    /// Parses a key written as hex (at least 32 hex digits).
    pub fn from_hex(hex: &str) -> Result<Self> {
        let hex = hex.trim();
        if hex.len() % 2 != 0 {
            return Err(TransportError::InvalidKey("odd number of hex digits"));
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
            .collect::<std::result::Result<Vec<u8>, _>>()
            .map_err(|_| TransportError::InvalidKey("not hex"))?;
        Self::new(bytes)
    }

    fn mac(&self, label: &[u8], transcript: &[&[u8]]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(label);
        for part in transcript {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac
    }

    pub(crate) fn server_proof(&self, transcript: &[&[u8]]) -> [u8; PROOF_LEN] {
        self.mac(SERVER_LABEL, transcript).finalize().into_bytes().into()
    }

    pub(crate) fn client_proof(&self, transcript: &[&[u8]]) -> [u8; PROOF_LEN] {
        self.mac(CLIENT_LABEL, transcript).finalize().into_bytes().into()
    }

    /// Constant-time check of a server's proof.
    pub(crate) fn verify_server(&self, transcript: &[&[u8]], proof: &[u8]) -> bool {
        self.mac(SERVER_LABEL, transcript).verify_slice(proof).is_ok()
    }

    /// Constant-time check of a client's proof.
    pub(crate) fn verify_client(&self, transcript: &[&[u8]], proof: &[u8]) -> bool {
        self.mac(CLIENT_LABEL, transcript).verify_slice(proof).is_ok()
    }
}

impl std::fmt::Debug for PreSharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreSharedKey(<{} bytes>)", self.0.len())
    }
}

pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| TransportError::Io(std::io::Error::other(e.to_string())))?;
    Ok(b)
}

pub(crate) fn nonce() -> Result<[u8; NONCE_LEN]> {
    random_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_key_label_and_transcript() {
        let k = PreSharedKey::new(*b"0123456789abcdef").unwrap();
        let other = PreSharedKey::new(*b"0123456789abcdeX").unwrap();
        let t: &[&[u8]] = &[b"hello", b"nonce"];
        let p = k.server_proof(t);
        assert!(k.verify_server(t, &p));
        assert!(!other.verify_server(t, &p));
        assert!(!k.verify_client(t, &p), "a server proof must not pass as a client proof");
        assert!(!k.verify_server(&[b"hello", b"nonc"], &p));
        assert!(!k.verify_server(&[b"hellon", b"once"], &p), "part boundaries are bound");
    }

    #[test]
    fn key_rules() {
        assert!(PreSharedKey::new(vec![1u8; 15]).is_err());
        assert!(PreSharedKey::from_hex("00112233445566778899aabbccddeeff").is_ok());
        assert!(PreSharedKey::from_hex("0011223344556677889").is_err());
        assert!(PreSharedKey::from_hex("zz112233445566778899aabbccddeeff").is_err());
        assert!(!format!("{:?}", PreSharedKey::generate().unwrap()).contains("0x"));
    }
}
