//! Client authentication, sans I/O: SCRAM-SHA-256 (server side, from stored verifiers), md5 and
//! cleartext password checks. The session drives the message exchange.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use rand::RngExt;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// What Postgres stores for a SCRAM-SHA-256 password: enough to verify a client without the
/// plaintext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

impl ScramVerifier {
    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 parts).
    pub fn parse(s: &str) -> Option<ScramVerifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iterations, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let verifier = ScramVerifier {
            iterations: iterations.parse().ok().filter(|&n| n > 0)?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?,
            server_key: B64.decode(server).ok()?,
        };
        (verifier.stored_key.len() == 32 && verifier.server_key.len() == 32).then_some(verifier)
    }

    /// Derives a verifier from a plaintext password (SASLprep-normalized, random salt).
    pub fn from_password(password: &str) -> ScramVerifier {
        let text = postgres_protocol::password::scram_sha_256(password.as_bytes());
        ScramVerifier::parse(&text)
            .expect("invariant: postgres-protocol emits a well-formed verifier")
    }
}

/// Why a client failed to authenticate. The client only ever sees 28P01 or 08P01.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("password authentication failed")]
    WrongPassword,
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
}

/// SCRAM state between server-first and client-final.
#[derive(Debug)]
pub struct ScramExchange {
    client_first_bare: String,
    server_first: String,
    nonce: String,
    gs2_header: String,
    verifier: ScramVerifier,
}

impl ScramExchange {
    /// Handles the client-first message; returns the exchange and the server-first message.
    ///
    /// # Errors
    /// A malformed message or a channel-binding request.
    pub fn start(
        verifier: &ScramVerifier,
        client_first: &[u8],
    ) -> Result<(ScramExchange, String), AuthError> {
        let text =
            std::str::from_utf8(client_first).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        let (cbind, rest) = text
            .split_once(',')
            .ok_or(AuthError::Malformed("no gs2 header"))?;
        match cbind {
            "n" | "y" => {}
            c if c.starts_with("p=") => return Err(AuthError::ChannelBinding),
            _ => return Err(AuthError::Malformed("bad channel binding flag")),
        }
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(AuthError::Malformed("no gs2 header"))?;
        if !authzid.is_empty() {
            return Err(AuthError::Malformed("authzid is not supported"));
        }
        let client_nonce = bare
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(AuthError::Malformed("no client nonce"))?;
        let mut server_part = [0u8; 18];
        rand::rng().fill(&mut server_part);
        let nonce = format!("{client_nonce}{}", B64.encode(server_part));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        let exchange = ScramExchange {
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            nonce,
            gs2_header: format!("{cbind},,"),
            verifier: verifier.clone(),
        };
        Ok((exchange, server_first))
    }

    /// Verifies the client-final message; returns the server-final message (`v=...`).
    ///
    /// # Errors
    /// [`AuthError::WrongPassword`] if the proof does not match.
    pub fn finish(self, client_final: &[u8]) -> Result<String, AuthError> {
        let text =
            std::str::from_utf8(client_final).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(AuthError::Malformed("no proof"))?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                channel = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        let channel = B64
            .decode(channel.ok_or(AuthError::Malformed("no channel binding"))?)
            .map_err(|_| AuthError::Malformed("bad channel binding"))?;
        if channel != self.gs2_header.as_bytes() {
            return Err(AuthError::Malformed("channel binding does not match"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(AuthError::Malformed("nonce does not match"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| AuthError::Malformed("bad proof"))?;
        if proof.len() != 32 {
            return Err(AuthError::WrongPassword);
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof
            .iter()
            .zip(&client_signature)
            .map(|(p, s)| p ^ s)
            .collect();
        let stored_key = Sha256::digest(&client_key);
        if !constant_time_eq(&stored_key, &self.verifier.stored_key) {
            return Err(AuthError::WrongPassword);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac =
        <HmacSha256 as KeyInit>::new_from_slice(key).expect("invariant: HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks an md5 password message (`md5` + hex) against the plaintext password.
pub fn md5_matches(user: &str, password: &str, salt: [u8; 4], response: &[u8]) -> bool {
    let expected =
        postgres_protocol::authentication::md5_hash(user.as_bytes(), password.as_bytes(), salt);
    constant_time_eq(expected.as_bytes(), response)
}

/// Checks a cleartext password message.
pub fn plain_matches(password: &str, response: &[u8]) -> bool {
    constant_time_eq(password.as_bytes(), response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs our server against postgres-protocol's client.
    fn exchange(server_password: &str, client_password: &str) -> Result<(), AuthError> {
        let verifier = ScramVerifier::from_password(server_password);
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let (server, server_first) = ScramExchange::start(&verifier, client.message())?;
        client
            .update(server_first.as_bytes())
            .expect("client accepts server-first");
        let server_final = server.finish(client.message())?;
        client
            .finish(server_final.as_bytes())
            .expect("client verifies the server");
        Ok(())
    }

    #[test]
    fn scram_accepts_right_and_rejects_wrong_password() {
        assert_eq!(exchange("s3cret", "s3cret"), Ok(()));
        assert_eq!(exchange("s3cret", "nope"), Err(AuthError::WrongPassword));
    }

    #[test]
    fn verifier_parsing() {
        let v = ScramVerifier::from_password("pw");
        assert_eq!(v.iterations, 4096);
        assert!(ScramVerifier::parse("SCRAM-SHA-256$x:y$z:w").is_none());
        assert!(ScramVerifier::parse("md5abc").is_none());
    }

    #[test]
    fn channel_binding_requests_are_refused() {
        let v = ScramVerifier::from_password("pw");
        assert_eq!(
            ScramExchange::start(&v, b"p=tls-server-end-point,,n=,r=abc").err(),
            Some(AuthError::ChannelBinding)
        );
        assert!(ScramExchange::start(&v, b"garbage").is_err());
    }

    #[test]
    fn md5_and_plain() {
        let salt = [1, 2, 3, 4];
        let good = postgres_protocol::authentication::md5_hash(b"app", b"pw", salt);
        assert!(md5_matches("app", "pw", salt, good.as_bytes()));
        assert!(!md5_matches("app", "other", salt, good.as_bytes()));
        assert!(plain_matches("pw", b"pw"));
        assert!(!plain_matches("pw", b"pw2"));
    }
}
