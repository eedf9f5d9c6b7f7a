//! The pod's /etc files, as pure functions of its config: resolv.conf from the DNS config,
//! hosts from the hostname and the pod's IPs (kubelet's managed format), hostname.
//! The caller reads the node's files and writes the results; nothing here touches the system.

use std::net::IpAddr;

use super::PodError;
use super::config::DnsConfig;

/// glibc reads at most 6 search domains; Kubernetes allows 32 and 2048 characters.
const MAX_SEARCHES: usize = 32;
const MAX_SEARCH_CHARS: usize = 2048;

/// resolv.conf for the pod: the node's (`host`) when the pod gives no DNS settings.
pub fn resolv_conf(dns: Option<&DnsConfig>, host: &str) -> Result<String, PodError> {
    let Some(dns) =
        dns.filter(|d| !(d.servers.is_empty() && d.searches.is_empty() && d.options.is_empty()))
    else {
        return Ok(host.to_string());
    };
    let invalid = |reason: String| PodError::InvalidConfig(format!("dns: {reason}"));
    let mut out = String::new();
    for s in &dns.servers {
        let ip: IpAddr = s
            .trim()
            .parse()
            .map_err(|_| invalid(format!("server {s:?} is not an IP address")))?;
        out.push_str(&format!("nameserver {ip}\n"));
    }
    if !dns.searches.is_empty() {
        if dns.searches.len() > MAX_SEARCHES {
            return Err(invalid(format!(
                "{} search domains, at most {MAX_SEARCHES}",
                dns.searches.len()
            )));
        }
        for s in &dns.searches {
            if s.is_empty() || s.chars().any(|c| c.is_whitespace()) {
                return Err(invalid(format!(
                    "search domain {s:?} is empty or holds spaces"
                )));
            }
        }
        let line = dns.searches.join(" ");
        if line.len() > MAX_SEARCH_CHARS {
            return Err(invalid(format!(
                "search line of {} characters, at most {MAX_SEARCH_CHARS}",
                line.len()
            )));
        }
        out.push_str(&format!("search {line}\n"));
    }
    if !dns.options.is_empty() {
        for o in &dns.options {
            if o.is_empty() || o.chars().any(|c| c.is_whitespace()) {
                return Err(invalid(format!("option {o:?} is empty or holds spaces")));
            }
        }
        out.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    Ok(out)
}

/// /etc/hosts for a pod with its own network namespace: localhost entries, then the
/// hostname on each pod IP (or on 127.0.1.1 while the pod has none).
pub fn hosts(hostname: &str, ips: &[IpAddr]) -> String {
    let mut out = String::from(
        "# Kubernetes-managed hosts file (keel).\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\n\
         fe00::0\tip6-mcastprefix\n\
         fe00::1\tip6-allnodes\n\
         fe00::2\tip6-allrouters\n",
    );
    if ips.is_empty() {
        out.push_str(&format!("127.0.1.1\t{hostname}\n"));
    }
    for ip in ips {
        out.push_str(&format!("{ip}\t{hostname}\n"));
    }
    out
}

/// Checks a hostname: 1 to 64 characters of letters, digits, `-` and `.` (the kernel takes
/// up to 64 bytes; RFC 1123 labels).
pub fn validate_hostname(name: &str) -> Result<(), PodError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['-', '.'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(PodError::InvalidConfig(format!(
            "hostname {name:?}: expected 1-64 letters, digits, '-' or '.'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_from_dns_config() {
        let dns = DnsConfig {
            servers: vec!["10.96.0.10".into(), "fd00::a".into()],
            searches: vec![
                "default.svc.cluster.local".into(),
                "svc.cluster.local".into(),
            ],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            resolv_conf(Some(&dns), "nameserver 1.1.1.1\n").unwrap(),
            "nameserver 10.96.0.10\nnameserver fd00::a\n\
             search default.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
        );
    }

    #[test]
    fn resolv_conf_falls_back_to_the_node() {
        let host = "nameserver 192.0.2.1\n";
        assert_eq!(resolv_conf(None, host).unwrap(), host);
        assert_eq!(
            resolv_conf(Some(&DnsConfig::default()), host).unwrap(),
            host
        );
    }

    #[test]
    fn bad_dns_is_refused_with_the_culprit() {
        let bad = DnsConfig {
            servers: vec!["dns.example".into()],
            ..Default::default()
        };
        let e = resolv_conf(Some(&bad), "").unwrap_err().to_string();
        assert!(e.contains("dns.example"), "{e}");
        let bad = DnsConfig {
            searches: vec!["a b".into()],
            ..Default::default()
        };
        assert!(resolv_conf(Some(&bad), "").is_err());
        let many = DnsConfig {
            searches: (0..33).map(|i| format!("d{i}")).collect(),
            ..Default::default()
        };
        assert!(resolv_conf(Some(&many), "").is_err());
    }

    #[test]
    fn hosts_maps_hostname_to_pod_ips() {
        let h = hosts("web-1", &["192.0.2.7".parse().unwrap()]);
        assert!(h.contains("127.0.0.1\tlocalhost\n"));
        assert!(h.ends_with("192.0.2.7\tweb-1\n"), "{h}");
        assert!(hosts("web-1", &[]).ends_with("127.0.1.1\tweb-1\n"));
    }

    #[test]
    fn hostnames_are_checked() {
        assert!(validate_hostname("web-1.example").is_ok());
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(65)] {
            assert!(validate_hostname(bad).is_err(), "{bad:?}");
        }
    }
}
