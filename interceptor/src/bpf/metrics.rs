//! bpf::metrics: what the programs did, read from their maps at each scrape: connections redirected,
//! spared and refused, records that could not be stored, packets dropped, and how full the connection
//! maps are.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use interceptor_common::CounterKind;

use super::Interceptor;

/// Reads the programs' per-CPU counters and the map sizes on every scrape.
#[derive(Debug)]
pub struct BpfCollector {
    interceptor: Arc<Interceptor>,
}

impl BpfCollector {
    pub fn new(interceptor: Arc<Interceptor>) -> Self {
        Self { interceptor }
    }
}

impl std::fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interceptor")
            .field("cgroup_root", &self.cgroup_root)
            .field("links", &self.links)
            .finish_non_exhaustive()
    }
}

impl Collector for BpfCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        match self.interceptor.counters() {
            Ok(counters) => {
                for (kind, name, help, label) in [
                    (
                        CounterKind::Connection,
                        "bpf_connections",
                        "Connections the connect programs handled, by outcome",
                        "outcome",
                    ),
                    (
                        CounterKind::PacketDrop,
                        "bpf_packets_dropped",
                        "Packets to an intercepted endpoint that escaped the redirect and were dropped, by reason",
                        "reason",
                    ),
                    (
                        CounterKind::BindRefusal,
                        "bpf_binds_refused",
                        "Workloads' binds refused in the node's network namespace, by reason",
                        "reason",
                    ),
                ] {
                    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                    for (counter, value) in counters.iter().filter(|(counter, _)| counter.kind() == kind) {
                        let labels = [(label, counter.label())];
                        ConstCounter::new(*value).encode(metric.encode_family(&labels)?)?;
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot read the BPF counters"),
        }
        let occupancy = self.interceptor.occupancy();
        let mut metric = encoder.encode_descriptor(
            "bpf_map_entries",
            "Entries held by the connection maps (LRU, fixed size)",
            None,
            MetricType::Gauge,
        )?;
        for (map, entries) in [
            ("connects_by_cookie", occupancy.connects_by_cookie),
            ("connects_by_tuple", occupancy.connects_by_tuple),
        ] {
            let labels = [("map", map)];
            ConstGauge::new(entries as i64).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
