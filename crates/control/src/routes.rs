//! Request routing: method + path → an operation on the disk, answered in JSON.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::de::DeserializeOwned;
use serde_json::json;
use vsnap_block::diff::{DiffFile, WriteOptions};
use vsnap_block::{BlockError, Disk, ExportPhase, LayerInfo};

use crate::api::{
    CutRequest, DeviceStatus, DiffFigures, ExportFormat, ExportRequest, ExportStatus, FoldRequest,
};
use crate::http::{Request, Response};
use crate::upload::Uploads;

/// Supplies the device's live status (connection, queues, faults) to the API.
pub type StatusFn = Arc<dyn Fn() -> DeviceStatus + Send + Sync>;

pub struct Api {
    disk: Arc<Disk>,
    status: StatusFn,
    /// Where exports to object storage are written before they are uploaded; without one,
    /// such exports are refused.
    upload_dir: Option<PathBuf>,
    uploads: Arc<Uploads>,
    figures: Arc<Figures>,
}

fn parse<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| Response::error(400, format!("invalid JSON body: {e}")))
}

fn block_error(e: BlockError) -> Response {
    let status = match &e {
        BlockError::NoSuchGeneration(_) => 404,
        BlockError::Conflict(_) | BlockError::ReadOnly => 409,
        _ => 500,
    };
    Response::error(status, e)
}

/// How an export request asks for its diff to be written.
fn write_options(r: &ExportRequest) -> WriteOptions {
    let mut opts = WriteOptions::new(r.compression);
    if let Some(f) = r.frame_size {
        opts.frame_size = f;
    }
    if let Some(d) = r.dedupe {
        opts.dedupe = d;
    }
    opts
}

/// What exported diffs cost, by generation and export target: read from the file once, when
/// first asked for (a generation exported again, elsewhere or otherwise, is read again).
#[derive(Default)]
struct Figures(Mutex<HashMap<u64, (PathBuf, DiffFigures)>>);

impl Figures {
    /// Reads the figures of the diff at `file`, the export of `generation` to `target` (the
    /// same path, or the URL it was uploaded to).
    fn record(&self, generation: u64, target: &Path, file: &Path) -> Option<DiffFigures> {
        let f: DiffFigures = DiffFile::open(file).ok()?.data_stats().into();
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(generation, (target.to_owned(), f));
        Some(f)
    }

    fn get(&self, l: &LayerInfo) -> Option<DiffFigures> {
        let target = l.export_path.as_deref()?;
        if l.export != ExportPhase::Done {
            return None;
        }
        let known = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&l.generation)
            .filter(|(t, _)| t == target)
            .map(|&(_, f)| f);
        known.or_else(|| self.record(l.generation, target, target))
    }
}

fn export_status(l: &LayerInfo) -> ExportStatus {
    ExportStatus {
        generation: l.generation,
        state: l.export,
        path: l.export_path.clone(),
        done_bytes: l.export_progress.map(|p| p.0),
        total_bytes: l.export_progress.map(|p| p.1),
        error: l.export_error.clone(),
        figures: None,
    }
}

impl Api {
    pub fn new(disk: Arc<Disk>, status: StatusFn) -> Self {
        Self {
            disk,
            status,
            upload_dir: None,
            uploads: Arc::default(),
            figures: Arc::default(),
        }
    }

    fn export_status(&self, l: &LayerInfo) -> ExportStatus {
        ExportStatus {
            figures: self.figures.get(l),
            ..export_status(l)
        }
    }

    /// Accepts exports to object-storage URLs, staging them in `dir` (created if needed).
    pub fn with_upload_dir(mut self, dir: PathBuf) -> Self {
        self.upload_dir = Some(dir);
        self
    }

    /// The layers, as the API reports them.
    fn layers(&self) -> Vec<LayerInfo> {
        self.disk
            .info()
            .layers
            .into_iter()
            .map(|l| self.uploads.overlay(l))
            .collect()
    }

    pub fn handle(&self, req: &Request) -> Response {
        let path = req.path.split('?').next().unwrap_or("");
        let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        let r = match (req.method.as_str(), parts.as_slice()) {
            ("GET", ["api", "v1", "info"]) => Ok(self.info()),
            ("GET", ["api", "v1", "stats"]) => Ok(self.stats()),
            ("GET", ["metrics"]) => Ok(self.metrics()),
            ("POST", ["api", "v1", "cut"]) => self.cut(&req.body),
            ("GET", ["api", "v1", "generations"]) => Ok(Response::json(200, &self.layers())),
            ("GET", ["api", "v1", "generations", g]) => {
                self.generation(g).map(|l| Response::json(200, &l))
            }
            ("POST", ["api", "v1", "generations", g, "export"]) => self.export(g, &req.body),
            ("GET", ["api", "v1", "generations", g, "export"]) => self
                .generation(g)
                .map(|l| Response::json(200, &self.export_status(&l))),
            ("DELETE", ["api", "v1", "generations", g, "export"]) => self.cancel(g),
            ("POST", ["api", "v1", "generations", g, "fold"]) => self.fold(g, &req.body),
            (_, ["api", "v1", "info" | "stats" | "cut" | "generations", ..]) | (_, ["metrics"]) => {
                Err(Response::error(
                    405,
                    format!("{} is not allowed on {path}", req.method),
                ))
            }
            _ => Err(Response::error(
                404,
                format!("no such endpoint: {} {path}", req.method),
            )),
        };
        let resp = r.unwrap_or_else(|e| e);
        if resp.status >= 400 {
            tracing::info!(method = %req.method, path, status = resp.status, "control request refused");
        }
        resp
    }

    fn info(&self) -> Response {
        let i = self.disk.info();
        let d = (self.status)();
        Response::json(
            200,
            &json!({
                "device": d.kind,
                "socket": d.socket,
                "serial": d.serial,
                "queues": d.queues,
                "connected": d.connected,
                "capacity": i.capacity,
                "block_size": i.block_size,
                "blocks": i.blocks,
                "readonly": i.readonly,
                "generation": i.generation,
                "base": i.base,
                "chain": i.chain,
            }),
        )
    }

    fn stats(&self) -> Response {
        let i = self.disk.info();
        let d = (self.status)();
        Response::json(
            200,
            &json!({
                "requests": i.stats,
                "faults": d.faults,
                "faults_total": d.faults.values().sum::<u64>(),
                "generation": i.generation,
                "dirty_blocks": i.dirty_blocks,
                "zero_blocks": i.zero_blocks,
                "untouched_blocks": i.untouched_blocks,
                "reclaimed_bytes": i.stats.reclaimed_bytes,
                "layer_allocated_bytes": i.layer_allocated_bytes,
                "capacity": i.capacity,
                "in_flight": self.disk.in_flight(),
                "generations": i.layers.len(),
                "open_layer_files": i.open_layer_files,
            }),
        )
    }

    fn metrics(&self) -> Response {
        let i = self.disk.info();
        let d = (self.status)();
        let s = &i.stats;
        let mut m = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            m.push_str(&format!(
                "# HELP vsnap_{name} {help}\n# TYPE vsnap_{name} {kind}\n"
            ));
            for (labels, v) in samples {
                m.push_str(&format!("vsnap_{name}{labels} {v}\n"));
            }
        };
        metric(
            "requests_total",
            "counter",
            "Completed requests by type.",
            &[
                ("{type=\"read\"}", s.reads),
                ("{type=\"write\"}", s.writes),
                ("{type=\"write_zeroes\"}", s.write_zeroes),
                ("{type=\"discard\"}", s.discards),
                ("{type=\"flush\"}", s.flushes),
            ],
        );
        metric(
            "bytes_total",
            "counter",
            "Bytes by request type.",
            &[
                ("{type=\"read\"}", s.read_bytes),
                ("{type=\"write\"}", s.written_bytes),
                ("{type=\"write_zeroes\"}", s.zeroed_bytes),
                ("{type=\"discard\"}", s.discarded_bytes),
            ],
        );
        metric(
            "faults_total",
            "counter",
            "Bad requests from the guest.",
            &[("", d.faults.values().sum())],
        );
        metric(
            "reclaimed_bytes_total",
            "counter",
            "Bytes of stored blocks punched out by discards and zero writes.",
            &[("", s.reclaimed_bytes)],
        );
        metric(
            "blocks",
            "gauge",
            "Blocks of the active layer by state.",
            &[
                ("{state=\"dirty\"}", i.dirty_blocks),
                ("{state=\"zero\"}", i.zero_blocks),
                ("{state=\"untouched\"}", i.untouched_blocks),
            ],
        );
        metric(
            "layer_allocated_bytes",
            "gauge",
            "Bytes allocated by the active layer's file.",
            &[("", i.layer_allocated_bytes)],
        );
        metric(
            "capacity_bytes",
            "gauge",
            "Device capacity.",
            &[("", i.capacity)],
        );
        metric(
            "generation",
            "gauge",
            "Active generation.",
            &[("", i.generation)],
        );
        metric(
            "layers",
            "gauge",
            "Layers in the stack, active included.",
            &[("", i.layers.len() as u64)],
        );
        // The figures of every finished export, by generation.
        let exported: Vec<(String, DiffFigures)> = self
            .layers()
            .iter()
            .filter_map(|l| {
                let f = self.figures.get(l)?;
                Some((format!("{{generation=\"{}\"}}", l.generation), f))
            })
            .collect();
        let per = |f: fn(&DiffFigures) -> u64| -> Vec<(&str, u64)> {
            exported.iter().map(|(g, x)| (g.as_str(), f(x))).collect()
        };
        metric(
            "export_raw_bytes",
            "gauge",
            "Bytes of the dirty blocks of an exported diff, uncompressed.",
            &per(|f| f.raw_bytes),
        );
        metric(
            "export_stored_bytes",
            "gauge",
            "Bytes an exported diff's data takes (compressed frames, reference checksums).",
            &per(|f| f.stored_bytes),
        );
        metric(
            "export_referenced_blocks",
            "gauge",
            "Blocks of an exported diff stored as references to its parent state.",
            &per(|f| f.referenced_blocks),
        );
        metric(
            "connected",
            "gauge",
            "1 while a VMM is connected.",
            &[("", u64::from(d.connected))],
        );
        Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: m.into_bytes(),
        }
    }

    fn cut(&self, body: &[u8]) -> Result<Response, Response> {
        let r: CutRequest = parse(body)?;
        let report = self.disk.cut(r.durable).map_err(block_error)?;
        tracing::info!(
            generation = report.generation,
            pause_us = report.pause_us,
            drained = report.drained,
            "cut"
        );
        Ok(Response::json(200, &report))
    }

    fn generation(&self, g: &str) -> Result<LayerInfo, Response> {
        let g: u64 = g
            .parse()
            .map_err(|_| Response::error(400, format!("generation {g:?} is not a number")))?;
        self.layers()
            .into_iter()
            .find(|l| l.generation == g)
            .ok_or_else(|| Response::error(404, format!("generation {g} does not exist")))
    }

    fn export(&self, g: &str, body: &[u8]) -> Result<Response, Response> {
        let layer = self.generation(g)?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(Response::error(
                400,
                "export needs a JSON body with \"path\"",
            ));
        }
        let r: ExportRequest = serde_json::from_slice(body)
            .map_err(|e| Response::error(400, format!("invalid JSON body: {e}")))?;
        if let Some(url) = r.path.to_str().filter(|p| vsnap_remote::is_url(p)) {
            return self.export_to_url(layer.generation, url, &r);
        }
        if !r.path.is_absolute() {
            return Err(Response::error(400, "\"path\" must be absolute"));
        }
        if !r.path.parent().is_some_and(|p| p.is_dir()) {
            return Err(Response::error(
                400,
                format!("the directory of {} does not exist", r.path.display()),
            ));
        }
        let opts = write_options(&r);
        let backing = match (r.format, r.backing) {
            (ExportFormat::Qcow2, None) => {
                return Err(Response::error(400, "a qcow2 export needs \"backing\""))
            }
            (ExportFormat::Vsnap, Some(_)) => {
                return Err(Response::error(400, "\"backing\" only applies to qcow2"))
            }
            (_, b) => b,
        };
        let job = self
            .disk
            .start_export(layer.generation, &r.path)
            .map_err(block_error)?;
        let (disk, path, generation) = (self.disk.clone(), r.path.clone(), layer.generation);
        let spawned = std::thread::Builder::new()
            .name(format!("vsnap-export-{generation}"))
            .spawn(move || match disk.run_export_with(generation, &path, backing.as_deref(), &opts, &job) {
                Ok(h) => tracing::info!(generation, path = %path.display(), data_bytes = h.data_len(), "export done"),
                Err(e) => tracing::warn!(generation, path = %path.display(), error = %e, "export failed"),
            });
        if let Err(e) = spawned {
            // Nothing will run the job: leave no generation "running" forever.
            let msg = format!("cannot start the export thread: {e}");
            self.disk.abort_export(generation, &msg);
            return Err(Response::error(500, msg));
        }
        let now = self.generation(g)?;
        Ok(Response::json(202, &self.export_status(&now)))
    }

    /// An export to object storage: written to the upload directory, then uploaded
    /// (crate::upload).
    fn export_to_url(
        &self,
        generation: u64,
        url: &str,
        r: &ExportRequest,
    ) -> Result<Response, Response> {
        let Some(dir) = &self.upload_dir else {
            return Err(Response::error(
                400,
                "this daemon exports to local paths only (it has no upload directory)",
            ));
        };
        if r.format != ExportFormat::Vsnap {
            return Err(Response::error(400, "qcow2 exports go to local paths"));
        }
        let object = match vsnap_remote::Location::parse(url) {
            Ok(vsnap_remote::Location::Object(o)) => o,
            Ok(vsnap_remote::Location::Local(_)) => unreachable!("is_url said it is a URL"),
            Err(e) => return Err(Response::error(400, e)),
        };
        if self.uploads.running(generation) {
            return Err(Response::error(
                409,
                format!("generation {generation} is being uploaded already"),
            ));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| Response::error(500, format!("{}: {e}", dir.display())))?;
        let local = dir.join(format!("gen-{generation}-{}.diff", std::process::id()));
        let _ = std::fs::remove_file(&local);
        let opts = write_options(r);
        let job = self
            .disk
            .start_export(generation, &local)
            .map_err(block_error)?;
        self.uploads.begin(generation, url.to_owned());
        let (disk, uploads) = (self.disk.clone(), self.uploads.clone());
        let (figures, target) = (self.figures.clone(), PathBuf::from(url));
        let spawned = std::thread::Builder::new()
            .name(format!("vsnap-upload-{generation}"))
            .spawn(
                move || match disk.run_export_with(generation, &local, None, &opts, &job) {
                    Ok(_) => {
                        // The local file goes once uploaded: take its figures first.
                        figures.record(generation, &target, &local);
                        uploads.upload(generation, &local, &object)
                    }
                    Err(e) => uploads.fail(generation, e.to_string()),
                },
            );
        if let Err(e) = spawned {
            let msg = format!("cannot start the export thread: {e}");
            self.disk.abort_export(generation, &msg);
            self.uploads.fail(generation, msg.clone());
            return Err(Response::error(500, msg));
        }
        let now = self.generation(&generation.to_string())?;
        Ok(Response::json(202, &self.export_status(&now)))
    }

    fn cancel(&self, g: &str) -> Result<Response, Response> {
        let l = self.generation(g)?;
        self.disk.cancel_export(l.generation).map_err(block_error)?;
        Ok(Response::json(
            202,
            &json!({ "generation": l.generation, "state": "cancelling" }),
        ))
    }

    fn fold(&self, g: &str, body: &[u8]) -> Result<Response, Response> {
        let l = self.generation(g)?;
        let r: FoldRequest = parse(body)?;
        self.disk.fold(l.generation, r.force).map_err(block_error)?;
        Ok(Response::json(200, &self.layers()))
    }
}
