//! Who is calling: the client's address as the audit trail records it.
//!
//! `X-Forwarded-For` is a header anyone can write, so it is believed only when the connection
//! comes from a proxy named in `TRUSTED_PROXIES`; then the address is the right-most entry that
//! is not itself a trusted proxy (the one the outermost trusted proxy saw), as nginx's
//! `real_ip_recursive` reads it. From anyone else the connection's own address is recorded.

use std::net::IpAddr;

use axum::http::{HeaderMap, header};

/// One CIDR block, e.g. `10.0.0.0/8` or `fd00::/8` (a bare address is a /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    network: IpAddr,
    bits: u8,
}

impl Cidr {
    fn parse(text: &str) -> Result<Cidr, String> {
        let (address, bits) = match text.split_once('/') {
            Some((address, bits)) => (address, Some(bits)),
            None => (text, None),
        };
        let network: IpAddr = address
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an address or CIDR block"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(bits) => bits
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { network, bits })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.network, ip) {
            // An IPv4 client seen through a dual-stack socket.
            (IpAddr::V4(_), IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return false,
            },
            _ => ip,
        };
        let prefix = |bytes: &[u8], n: u8| -> Vec<u8> {
            let mut out = bytes.to_vec();
            let n = usize::from(n);
            for (i, b) in out.iter_mut().enumerate() {
                let keep = n.saturating_sub(i * 8).min(8);
                *b &= if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
            }
            out
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix(&net.octets(), self.bits) == prefix(&ip.octets(), self.bits)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix(&net.octets(), self.bits) == prefix(&ip.octets(), self.bits)
            }
            _ => false,
        }
    }
}

/// The proxies whose forwarding headers are believed (`TRUSTED_PROXIES`).
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies {
    blocks: Vec<Cidr>,
}

impl TrustedProxies {
    pub fn parse(items: &[String]) -> Result<TrustedProxies, String> {
        let blocks = items
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(Cidr::parse)
            .collect::<Result<_, _>>()?;
        Ok(TrustedProxies { blocks })
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.blocks.iter().any(|b| b.contains(ip))
    }

    /// The client's address: the connection's, or, when that is a trusted proxy, what the
    /// proxies recorded in `X-Forwarded-For`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        // Right to left: each trusted hop vouches for the one before it.
        let hops: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|hop| hop.trim().parse::<IpAddr>().ok())
            .collect();
        for hop in hops.into_iter().rev() {
            client = hop;
            if !self.trusts(hop) {
                break;
            }
        }
        client
    }
}

/// The client's address and user agent, as the audit trail records them.
pub fn client_details(
    proxies: &TrustedProxies,
    peer: IpAddr,
    headers: &HeaderMap,
) -> (String, Option<String>) {
    let ip = proxies.client_ip(peer, headers).to_string();
    let agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(512).collect());
    (ip, agent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", xff.parse().unwrap());
        h
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let none = TrustedProxies::default();
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(none.client_ip(local, &headers("6.6.6.6")), local);

        let proxies = TrustedProxies::parse(&["10.0.0.0/8".into(), "127.0.0.1".into()]).unwrap();
        assert_eq!(
            proxies.client_ip(local, &headers("6.6.6.6")).to_string(),
            "6.6.6.6"
        );
        // A spoofed left-most entry stays behind the one the proxy saw.
        assert_eq!(
            proxies
                .client_ip(local, &headers("1.1.1.1, 203.0.113.9, 10.1.2.3"))
                .to_string(),
            "203.0.113.9"
        );
        let stranger: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(proxies.client_ip(stranger, &headers("6.6.6.6")), stranger);
        // Garbage in the header leaves the proxy's own address.
        assert_eq!(proxies.client_ip(local, &headers("not an ip")), local);
    }

    #[test]
    fn cidr_blocks_match_their_prefix_only() {
        let block = Cidr::parse("192.168.0.0/16").unwrap();
        assert!(block.contains("192.168.200.1".parse().unwrap()));
        assert!(!block.contains("192.169.0.1".parse().unwrap()));
        assert!(block.contains("::ffff:192.168.1.1".parse().unwrap()));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", "::/129"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }
}
