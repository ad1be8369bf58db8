//! nodewatt collector: MQTT in, validated line protocol out to InfluxDB.

pub mod billing;
pub mod check;
pub mod config;
pub mod influx;
pub mod influxql;
pub mod ingest;
pub mod lineproto;
pub mod report;
pub mod series;
pub mod stats;
pub mod validate;
