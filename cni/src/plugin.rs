//! One invocation, end to end: environment and stdin in, stdout text and exit status out. The
//! binary is a three-line shell around [`execute`].

use crate::pending::PendingDelete;
use crate::protocol::{self, Command, ErrorReply, LATEST_VERSION};
use crate::{Error, add, check, config, del, gc, status};

/// What to print and how to exit.
#[derive(Debug)]
pub struct Outcome {
    /// stdout (JSON or empty).
    pub stdout: String,
    /// Process exit status.
    pub exit_code: i32,
    /// A DEL's deletion left to finish once the answer is out (see `pending`).
    pub pending: Option<PendingDelete>,
}

/// Runs one invocation. `env` looks up `CNI_*` variables.
pub fn execute(env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    // The error reply should carry the request's version; fish it out even from a bad config.
    let version = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|s| s.as_str())
                .map(str::to_string)
        })
        .filter(|v| protocol::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST_VERSION.to_string());
    match dispatch(env, stdin) {
        Ok((stdout, pending)) => Outcome {
            stdout,
            exit_code: 0,
            pending,
        },
        Err(e) => {
            let reply = ErrorReply {
                cni_version: version,
                code: e.code(),
                msg: e.to_string(),
                details: String::new(),
            };
            Outcome {
                stdout: serde_json::to_string(&reply).unwrap_or_default(),
                exit_code: 1,
                pending: None,
            }
        }
    }
}

/// The outcome when stdin itself could not be read.
pub fn stdin_failure(e: std::io::Error) -> Outcome {
    let err = Error::Stdin(e);
    let reply = ErrorReply {
        cni_version: LATEST_VERSION.to_string(),
        code: err.code(),
        msg: err.to_string(),
        details: String::new(),
    };
    Outcome {
        stdout: serde_json::to_string(&reply).unwrap_or_default(),
        exit_code: 1,
        pending: None,
    }
}

type Answer = (String, Option<PendingDelete>);

fn dispatch(env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Answer, Error> {
    let inv = protocol::parse_env(env)?;
    if inv.command == Command::Version {
        let requested = serde_json::from_slice::<serde_json::Value>(stdin)
            .ok()
            .and_then(|v| {
                v.get("cniVersion")
                    .and_then(|s| s.as_str())
                    .map(str::to_string)
            });
        return Ok((to_json(&protocol::version_info(requested.as_deref())), None));
    }
    let net = config::validate(config::parse(stdin)?)?;
    protocol::check_verb_version(inv.command, &net.cni_version)?;
    let stdout = match inv.command {
        Command::Add => to_json(&add::add(&inv, &net)?),
        Command::Del => return Ok((String::new(), del::del(&inv, &net)?)),
        Command::Check => check::check(&inv, &net).map(|()| String::new())?,
        Command::Gc => gc::gc(&net).map(|_| String::new())?,
        Command::Status => status::status(&net).map(|()| String::new())?,
        Command::Version => String::new(),
    };
    Ok((stdout, None))
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    // Serialising plain data structs with string keys cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run(pairs: &[(&str, &str)], stdin: &str) -> (serde_json::Value, i32) {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let out = execute(|k| map.get(k).cloned(), stdin.as_bytes());
        (
            serde_json::from_str(&out.stdout).unwrap_or_default(),
            out.exit_code,
        )
    }

    #[test]
    fn version_command() {
        let (v, rc) = run(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
        assert_eq!(rc, 0);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["supportedVersions"][4], "1.1.0");
    }

    #[test]
    fn errors_are_json_with_codes() {
        let (v, rc) = run(&[("CNI_COMMAND", "ADD")], "{}");
        assert_eq!(rc, 1);
        assert_eq!(v["code"], 4);
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", "/nonexistent/ns"),
            ("CNI_IFNAME", "eth0"),
        ];
        let (v, _) = run(&add, "{not json");
        assert_eq!(v["code"], 6);
        assert_eq!(v["cniVersion"], "1.1.0");
        let (v, _) = run(&add, r#"{"cniVersion":"1.0.0","name":"n","type":"other"}"#);
        assert_eq!(v["code"], 7);
        assert_eq!(v["cniVersion"], "1.0.0");
        let (v, _) = run(
            &add,
            r#"{"cniVersion":"1.0.0","name":"n","type":"keel-cni"}"#,
        );
        assert_eq!(v["code"], 3, "missing netns: {v}");
        let gc = [("CNI_COMMAND", "GC")];
        let (v, _) = run(
            &gc,
            r#"{"cniVersion":"1.0.0","name":"n","type":"keel-cni"}"#,
        );
        assert_eq!(v["code"], 1);
    }
}
