//! The streaming server's token cache: each Exec, Attach or PortForward RPC stores its request
//! under a fresh random token, and the URL it answers names the token. A token is good for one
//! connection within [`TOKEN_TTL`] (kubelet's defaults), so a URL that leaked is useless once
//! used or a minute old.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;

/// How long a token stays valid (kubelet's `streaming.DefaultConfig.StreamCreationTimeout`).
pub(crate) const TOKEN_TTL: Duration = Duration::from_secs(60);
/// At most this many tokens wait for their connection (kubelet's `maxInFlight`).
pub(crate) const MAX_IN_FLIGHT: usize = 1000;

/// Requests waiting for their connection, by token.
pub(crate) struct Tokens<T> {
    ttl: Duration,
    map: Mutex<HashMap<String, (Instant, T)>>,
}

impl<T> Tokens<T> {
    pub fn new(ttl: Duration) -> Self {
        Tokens {
            ttl,
            map: Mutex::default(),
        }
    }

    /// Stores `req` and answers its token; None when [`MAX_IN_FLIGHT`] unexpired tokens wait.
    pub fn insert(&self, req: T) -> Option<String> {
        self.insert_at(req, Instant::now())
    }

    fn insert_at(&self, req: T, now: Instant) -> Option<String> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
        if map.len() >= MAX_IN_FLIGHT {
            return None;
        }
        // 32 random bytes, URL-safe: the token is a path segment.
        let token =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        map.insert(token.clone(), (now, req));
        Some(token)
    }

    /// Takes the request of `token`: None when unknown, already used or expired.
    pub fn take(&self, token: &str) -> Option<T> {
        self.take_at(token, Instant::now())
    }

    fn take_at(&self, token: &str, now: Instant) -> Option<T> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (at, req) = map.remove(token)?;
        (now.duration_since(at) < self.ttl).then_some(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_single_use() {
        let t = Tokens::new(TOKEN_TTL);
        let a = t.insert(1).unwrap();
        let b = t.insert(2).unwrap();
        assert_ne!(a, b);
        assert!(a.len() >= 40 && !a.contains('/'), "{a}");
        assert_eq!(t.take(&b), Some(2));
        assert_eq!(t.take(&b), None);
        assert_eq!(t.take(&a), Some(1));
        assert_eq!(t.take("bogus"), None);
    }

    #[test]
    fn a_token_expires() {
        let t = Tokens::new(Duration::from_secs(60));
        let start = Instant::now();
        let a = t.insert_at("a", start).unwrap();
        let b = t.insert_at("b", start).unwrap();
        assert_eq!(t.take_at(&a, start + Duration::from_secs(59)), Some("a"));
        assert_eq!(t.take_at(&b, start + Duration::from_secs(61)), None);
    }

    #[test]
    fn in_flight_tokens_are_capped_and_expired_ones_pruned() {
        let t = Tokens::new(Duration::from_secs(60));
        let start = Instant::now();
        for i in 0..MAX_IN_FLIGHT {
            t.insert_at(i, start).unwrap();
        }
        assert!(t.insert_at(0, start).is_none());
        assert!(t.insert_at(0, start + Duration::from_secs(61)).is_some());
    }
}
