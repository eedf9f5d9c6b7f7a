//! keel-agent: the node agent. Registers the Node, heartbeats, and drives the pods bound to it
//! through a CRI client interface.
//!
//! Filled by the standalone cluster issue.
