//! Writes line protocol to InfluxDB over HTTP: `/write` (1.x) or `/api/v2/write`
//! (2.x, 3.x, and compatible servers), gzip-compressed, millisecond precision.

use std::io::Write;

use reqwest::{StatusCode, Url};

use crate::config::{Api, InfluxConfig};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Worth retrying: the server is unreachable, overloaded, or refuses our credentials
    /// (an operator can fix that while the broker keeps the data).
    #[error("{0}")]
    Retry(String),
    /// The server refused the data itself (400, 422) or its size (413); sending the same
    /// body again cannot succeed, a part of it may.
    #[error("{message}")]
    Refused { message: String },
}

#[derive(Debug, thiserror::Error)]
#[error("influxdb: {0}")]
pub struct SetupError(String);

pub struct Influx {
    client: reqwest::Client,
    /// `influxdb.url`, for messages.
    base: String,
    write_url: Url,
    query_url: Url,
    api: Api,
    database: String,
    create_database: bool,
    basic: Option<(String, String)>,
    token: Option<String>,
    gzip: bool,
}

fn read_secret(what: &str, path: &std::path::Path) -> Result<String, SetupError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
        .map_err(|e| SetupError(format!("cannot read {what} {}: {e}", path.display())))
}

fn endpoint(base: &str, path: &str, params: &[(&str, &str)]) -> Result<Url, SetupError> {
    let mut u = Url::parse(&format!("{}/{path}", base.trim_end_matches('/')))
        .map_err(|e| SetupError(format!("bad url {base:?}: {e}")))?;
    u.query_pairs_mut().extend_pairs(params);
    Ok(u)
}

impl Influx {
    pub fn new(cfg: &InfluxConfig) -> Result<Influx, SetupError> {
        let mut builder = reqwest::Client::builder().timeout(cfg.timeout);
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| SetupError(format!("cannot read ca_file {}: {e}", ca.display())))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| SetupError(format!("ca_file {}: {e}", ca.display())))?;
            builder = builder.add_root_certificate(cert);
        }
        let client = builder
            .build()
            .map_err(|e| SetupError(format!("HTTP client: {e}")))?;
        let (write_url, token) = match cfg.api {
            Api::V1 => {
                let mut p = vec![("db", cfg.database.as_str()), ("precision", "ms")];
                if let Some(rp) = &cfg.retention_policy {
                    p.push(("rp", rp));
                }
                (endpoint(&cfg.url, "write", &p)?, None)
            }
            Api::V2 => {
                let org = cfg.org.as_deref().unwrap_or_default();
                let bucket = cfg.bucket.as_deref().unwrap_or_default();
                let p = [("org", org), ("bucket", bucket), ("precision", "ms")];
                let token = match &cfg.token_file {
                    Some(f) => Some(read_secret("token_file", f)?),
                    None => None,
                };
                (endpoint(&cfg.url, "api/v2/write", &p)?, token)
            }
        };
        let basic = match (&cfg.username, &cfg.password_file) {
            (Some(u), Some(p)) => Some((u.clone(), read_secret("password_file", p)?)),
            (Some(u), None) => Some((u.clone(), String::new())),
            _ => None,
        };
        Ok(Influx {
            client,
            base: cfg.url.trim_end_matches('/').to_string(),
            write_url,
            query_url: endpoint(&cfg.url, "query", &[])?,
            api: cfg.api,
            // On v2 the v1-compatible /query maps the bucket to a database.
            database: match cfg.api {
                Api::V1 => cfg.database.clone(),
                Api::V2 => cfg.bucket.clone().unwrap_or_default(),
            },
            create_database: cfg.create_database,
            basic,
            token,
            gzip: cfg.gzip,
        })
    }

    /// A request that got no answer: where it went, the innermost cause (reqwest's own
    /// message is only "error sending request") and what to check.
    fn unreachable(&self, e: reqwest::Error) -> String {
        let hint = if e.is_timeout() {
            "no answer within the timeout ([influxdb] timeout, or [billing] query_timeout for bills): is influxd overloaded or is that port something else?"
        } else {
            "is influxd running, and are [influxdb] url and ca_file right?"
        };
        let mut cause: &dyn std::error::Error = &e;
        while let Some(inner) = cause.source() {
            cause = inner;
        }
        format!("cannot reach InfluxDB at {}: {cause}; {hint}", self.base)
    }

    /// A refusal, with where it came from and, for credentials, what to check.
    fn answered(&self, status: StatusCode, text: &str) -> String {
        let hint = match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                " (check [influxdb] username and password_file, or token_file, and the user's rights on the database)"
            }
            _ => "",
        };
        format!(
            "InfluxDB at {} answered {status}: {}{hint}",
            self.base,
            text.trim()
        )
    }

    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let req = match &self.basic {
            Some((u, p)) => req.basic_auth(u, Some(p)),
            None => req,
        };
        match &self.token {
            Some(t) => req.header("Authorization", format!("Token {t}")),
            None => req,
        }
    }

    /// Whether `serve` creates a missing database (v1 with `create_database`; v2 buckets
    /// are created by operators).
    pub fn creates_database(&self) -> bool {
        self.api == Api::V1 && self.create_database
    }

    /// The user it logs in as, if any.
    pub fn user(&self) -> Option<&str> {
        self.basic.as_ref().map(|(u, _)| u.as_str())
    }

    /// The server's version, from `/ping` (which needs no credentials).
    pub async fn ping(&self) -> Result<String, String> {
        let url = endpoint(&self.base, "ping", &[]).map_err(|e| e.to_string())?;
        let resp = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if !resp.status().is_success() {
            return Err(self.answered(resp.status(), ""));
        }
        let version = resp
            .headers()
            .get("X-Influxdb-Version")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("of unknown version");
        Ok(format!("InfluxDB {version} at {}", self.base))
    }

    /// Whether writes would be taken, without writing anything: InfluxDB answers an empty
    /// write 204, or 404 when the database is missing, 401/403 without the right. The
    /// refusal's status, if InfluxDB answered.
    pub async fn probe_write(&self) -> Result<(), (Option<StatusCode>, String)> {
        let resp = self
            .auth(self.client.post(self.write_url.clone()))
            .body(Vec::new())
            .send()
            .await
            .map_err(|e| (None, self.unreachable(e)))?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            s => Err((
                Some(s),
                self.answered(s, &resp.text().await.unwrap_or_default()),
            )),
        }
    }

    /// The database it writes to and queries (on v2, the bucket).
    pub fn database(&self) -> &str {
        &self.database
    }

    /// v1 with `create_database`: `CREATE DATABASE` (a no-op when it exists). v2 buckets
    /// are created by operators.
    pub async fn ensure_database(&self) -> Result<(), WriteError> {
        if !self.creates_database() {
            return Ok(());
        }
        let q = format!("CREATE DATABASE \"{}\"", self.database.replace('"', "\\\""));
        let mut url = self.query_url.clone();
        url.query_pairs_mut().append_pair("q", &q);
        let resp = self
            .auth(self.client.post(url))
            .send()
            .await
            .map_err(|e| WriteError::Retry(self.unreachable(e)))?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            s => Err(WriteError::Retry(format!(
                "CREATE DATABASE: {}",
                self.answered(s, &resp.text().await.unwrap_or_default())
            ))),
        }
    }

    /// Runs an InfluxQL query through `/query` (on 2.x/3.x, the v1-compatible endpoint
    /// with the bucket as database); timestamps in ms.
    ///
    /// Answers `q` whole; where that answer says `partial` somewhere, asks again in chunks.
    /// InfluxDB 1.x applies `max-row-limit` only to whole answers, and before 1.7.8 marks
    /// a complete series of more than 10,000 values `partial` in them. Chunked answers
    /// cost InfluxDB more where they hold many series (one chunk each at least: 20-30 %
    /// on a bill of 30,000 series), so they are not the first try.
    pub async fn query(&self, q: &str) -> Result<serde_json::Value, String> {
        let v = self.query_as(q, false).await?;
        if !has_partial(&v) {
            return Ok(v);
        }
        tracing::debug!("a whole answer said partial; asking again in chunks");
        self.query_as(q, true).await
    }

    /// In chunks from the first try: for answers of few, long series (job totals).
    pub async fn query_chunked(&self, q: &str) -> Result<serde_json::Value, String> {
        self.query_as(q, true).await
    }

    async fn query_as(&self, q: &str, chunked: bool) -> Result<serde_json::Value, String> {
        let mut url = self.query_url.clone();
        url.query_pairs_mut()
            .append_pair("db", &self.database)
            .append_pair("epoch", "ms")
            .append_pair("q", q);
        if chunked {
            url.query_pairs_mut()
                .append_pair("chunked", "true")
                .append_pair("chunk_size", "10000");
        }
        let resp = self
            .auth(self.client.get(url))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(self.answered(status, &text));
        }
        merge_chunks(&text).map_err(|e| self.failed(&e))
    }

    /// A query's error with the server it came from, and what to check for a missing
    /// database (a typo in the config, or a server serve never wrote to).
    fn failed(&self, e: &str) -> String {
        let e = e.strip_prefix("InfluxDB: ").unwrap_or(e);
        let hint = match e.starts_with("database not found") {
            true => "; check [influxdb] database (bucket on InfluxDB 2) in the config (SHOW DATABASES lists those there)",
            false => "",
        };
        format!("InfluxDB at {}: {e}{hint}", self.base)
    }

    pub async fn write(&self, body: &[u8]) -> Result<(), WriteError> {
        let mut req = self
            .auth(self.client.post(self.write_url.clone()))
            .header("Content-Type", "text/plain; charset=utf-8");
        if self.gzip {
            let mut gz = flate2::write::GzEncoder::new(
                Vec::with_capacity(body.len() / 4),
                flate2::Compression::fast(),
            );
            let compressed = gz
                .write_all(body)
                .and_then(|_| gz.finish())
                .map_err(|e| WriteError::Retry(format!("gzip: {e}")))?;
            req = req.header("Content-Encoding", "gzip").body(compressed);
        } else {
            req = req.body(body.to_vec());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| WriteError::Retry(self.unreachable(e)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        let msg = self.answered(status, &text);
        Err(match status {
            StatusCode::BAD_REQUEST
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNPROCESSABLE_ENTITY => WriteError::Refused { message: msg },
            StatusCode::NOT_FOUND if text.contains("database not found") => {
                // Dropped while we run: recreate it, then the retry succeeds.
                let _ = self.ensure_database().await;
                WriteError::Retry(msg)
            }
            _ => WriteError::Retry(msg),
        })
    }
}

/// Whether an answer (whole, or joined from chunks) says a result or series is
/// `partial`: cut short, or not finished.
pub fn has_partial(v: &serde_json::Value) -> bool {
    v["results"].as_array().into_iter().flatten().any(|r| {
        r["partial"] == true
            || r["series"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["partial"] == true)
    })
}

/// One answer from the documents of a chunked one (or the one of a whole one): a series
/// the server split over chunks (`partial` in all but its last) is joined again. What
/// stays `partial` (the series or the result) was not finished when the answer ended,
/// which billing refuses. Series and values are moved, not copied: answers can hold
/// 100,000 series.
pub fn merge_chunks(text: &str) -> Result<serde_json::Value, String> {
    use serde_json::{json, Value};
    let mut results: Vec<Value> = Vec::new();
    for doc in serde_json::Deserializer::from_str(text).into_iter::<Value>() {
        let mut doc = doc.map_err(|e| format!("InfluxDB answer is not JSON: {e}"))?;
        if let Some(err) = doc["error"].as_str() {
            return Err(format!("InfluxDB: {err}"));
        }
        let Value::Array(rs) = doc["results"].take() else {
            continue;
        };
        for mut r in rs {
            if let Some(err) = r["error"].as_str() {
                return Err(format!("InfluxDB: {err}"));
            }
            let id = r["statement_id"].take();
            let acc = match results.last_mut() {
                Some(last) if last["statement_id"] == id => last,
                _ => {
                    results.push(json!({"statement_id": id, "series": []}));
                    results.last_mut().expect("pushed above")
                }
            };
            acc["partial"] = r["partial"].take();
            let Some(series) = acc["series"].as_array_mut() else {
                continue;
            };
            let Value::Array(incoming) = r["series"].take() else {
                continue;
            };
            for mut s in incoming {
                match series.last_mut() {
                    Some(last)
                        if last["partial"] == true
                            && last["name"] == s["name"]
                            && last["tags"] == s["tags"]
                            && last["columns"] == s["columns"] =>
                    {
                        if let (Value::Array(v), Value::Array(more)) =
                            (&mut last["values"], s["values"].take())
                        {
                            v.extend(more);
                        }
                        last["partial"] = s["partial"].take();
                    }
                    _ => series.push(s),
                }
            }
        }
    }
    // Flags that ended false say nothing: leave only the ones that are set.
    for r in &mut results {
        if let Some(o) = r.as_object_mut() {
            o.retain(|k, v| k != "partial" || *v == true);
        }
        for s in r["series"].as_array_mut().into_iter().flatten() {
            if let Some(o) = s.as_object_mut() {
                o.retain(|k, v| k != "partial" || *v == true);
            }
        }
    }
    Ok(json!({ "results": results }))
}

#[cfg(test)]
mod chunk_tests {
    use super::merge_chunks;

    #[test]
    fn chunks_join_into_one_answer_and_an_unfinished_one_stays_partial() {
        // As influxd 1.6.7 answers `SELECT v FROM m GROUP BY h` with chunk_size=2.
        let text = r#"{"results":[{"statement_id":0,"series":[{"name":"m","tags":{"h":"a"},"columns":["time","v"],"values":[[1000,0],[1001,1]],"partial":true}],"partial":true}]}
{"results":[{"statement_id":0,"series":[{"name":"m","tags":{"h":"a"},"columns":["time","v"],"values":[[1002,2]]}],"partial":true}]}
{"results":[{"statement_id":0,"series":[{"name":"m","tags":{"h":"b"},"columns":["time","v"],"values":[[2000,0],[2001,1]],"partial":true}],"partial":true}]}
{"results":[{"statement_id":0,"series":[{"name":"m","tags":{"h":"b"},"columns":["time","v"],"values":[[2002,2]]}]}]}
"#;
        let v = merge_chunks(text).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"results":[{"statement_id":0,"series":[
                {"name":"m","tags":{"h":"a"},"columns":["time","v"],"values":[[1000,0],[1001,1],[1002,2]]},
                {"name":"m","tags":{"h":"b"},"columns":["time","v"],"values":[[2000,0],[2001,1],[2002,2]]}
            ]}]})
        );
        // The same answer cut after its third document: what is unfinished says so.
        let cut: String = text.lines().take(3).map(|l| format!("{l}\n")).collect();
        let v = merge_chunks(&cut).unwrap();
        assert_eq!(v["results"][0]["partial"], true);
        assert_eq!(v["results"][0]["series"][1]["partial"], true);
        // An empty answer, and errors in either place.
        let v = merge_chunks(r#"{"results":[{"statement_id":0}]}"#).unwrap();
        assert_eq!(v["results"][0]["series"], serde_json::json!([]));
        assert!(merge_chunks(r#"{"error":"error parsing query"}"#)
            .unwrap_err()
            .contains("error parsing query"));
        assert!(
            merge_chunks(r#"{"results":[{"statement_id":0,"error":"timeout"}]}"#)
                .unwrap_err()
                .contains("timeout")
        );
        assert!(merge_chunks("{\"results\":[").is_err());
    }
}
