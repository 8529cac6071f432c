//! `worker`: the per-GPU process of an effnet-cluster run, and the tools around the model.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tracing_subscriber::EnvFilter;

use effnet::config::EfficientNetConfig;
use effnet::{device, predict};
use worker::augment::Augment;
use worker::bench;
use worker::cli::*;
use worker::cluster::{JoinOptions, JoinOutcome};
use worker::source;

const TORCH_BENCH: &str = include_str!("../scripts/torch_bench.py");

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Keep freed memory mapped for reuse. By default glibc returns freed blocks above 128 KiB
/// (a threshold it raises as it goes) to the kernel and trims its heaps, so the next buffer
/// of the same size is fresh pages the kernel must fault in and zero. A worker frees and
/// allocates buffers of the same few sizes all the time (HTTP/2 receive buffers, gradient
/// pieces, batches); the page faults cost the all-reduce a fifth of its speed here
/// (docs/benchmarks.md). Blocks above 32 MiB are still mapped and unmapped one by one, and
/// up to 256 MiB of free heap stays with the process.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called first thing in main, before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_env("WORKER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Predict(args) => run_predict(args),
        Command::Evaluate(args) => run_evaluate(args),
        Command::Summary(args) => run_summary(args),
        Command::Bench(BenchCommand::Model(args)) => run_bench_model(args),
        Command::Bench(BenchCommand::Data(args)) => run_bench_data(args),
        Command::Bench(BenchCommand::Allreduce(args)) => run_bench_allreduce(args),
        Command::Join(args) => run_join(args),
    }
}

fn run_predict(args: PredictArgs) -> Result<()> {
    if args.top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    let device = args.device.choice().select()?.device;
    let loaded =
        source::load(args.model.as_deref(), &args.weights, &device).context("cannot load the model")?;
    let size = args.image_size.unwrap_or(loaded.config.resolution);
    let top_k = args.top_k.min(loaded.classes.len());
    let predictions = predict::predict(&loaded, &args.images, top_k, size)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&predictions)?);
    } else {
        print!("{}", predict::render_text(&predictions));
    }
    Ok(())
}

fn run_evaluate(args: EvaluateArgs) -> Result<()> {
    let device = args.device.choice().select()?.device;
    let config = run_config::RunConfig {
        data: args.data.clone(),
        image_size: args.image_size,
        batch_size: args.batch_size,
        split: args.split.clone(),
        limit_test: args.limit_test,
        seed: args.seed,
        ..Default::default()
    };
    config.validate().map_err(|e| anyhow::anyhow!(e))?;
    let loaded = source::load(None, &args.weights, &device).context("cannot load the model")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let trainer = worker::train::Trainer::for_evaluation(&config, device, runtime.handle(), loaded)?;
    let totals = trainer.evaluate_test()?;
    let classes = trainer.class_names();
    let n = classes.len();
    let per_class: Vec<serde_json::Value> = classes
        .iter()
        .enumerate()
        .map(|(c, name)| {
            let row = &totals.confusion[c * n..(c + 1) * n];
            let count: u64 = row.iter().sum();
            serde_json::json!({
                "class": name,
                "count": count,
                "accuracy": if count == 0 { None } else { Some(row[c] as f64 / count as f64) },
            })
        })
        .collect();
    let accuracy = totals.correct as f64 / totals.count.max(1) as f64;
    let loss = totals.loss_sum / totals.count.max(1) as f64;
    if args.json {
        let confusion: Vec<&[u64]> = totals.confusion.chunks(n.max(1)).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "images": totals.count, "test_loss": loss, "test_accuracy": accuracy,
                "per_class": per_class, "confusion": confusion,
            }))?
        );
    } else {
        println!(
            "{} test images: loss {loss:.4}, accuracy {:.2}%",
            totals.count,
            accuracy * 100.0
        );
        for row in &per_class {
            let acc = row["accuracy"].as_f64().map(|a| format!("{:.2}%", a * 100.0));
            println!(
                "  {:<16} {:>6} images  {}",
                row["class"].as_str().unwrap_or_default(),
                row["count"],
                acc.unwrap_or_else(|| "-".into())
            );
        }
    }
    Ok(())
}

fn run_summary(args: SummaryArgs) -> Result<()> {
    use effnet::phase::Phase;
    let cfg = EfficientNetConfig::from_name(&args.model)?;
    let head = match args.head.as_str() {
        "none" => None,
        name => Some(
            name.parse::<effnet::model::HeadKind>()
                .map_err(anyhow::Error::msg)?,
        ),
    };
    let phases = match args.phase.as_deref() {
        Some("head") => vec![Phase::Head],
        Some("finetune") => vec![Phase::FineTune],
        Some("scratch") => vec![Phase::Scratch],
        _ => vec![Phase::Head, Phase::FineTune],
    };
    if args.classes == 0 || args.image_size < 32 {
        bail!("--classes must be at least 1 and --image-size at least 32");
    }
    print!(
        "{}",
        effnet::summary::summarize(&cfg, head, args.classes, args.image_size, &phases)
    );
    Ok(())
}

fn run_bench_data(args: BenchDataArgs) -> Result<()> {
    let device = args.device.choice().select()?.device;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let store = if args.data == "synthetic" {
        runtime.block_on(dataset::store::DataStore::synthetic(args.images, 10, 0))?
    } else {
        dataset::store::DataStore::open(&worker::data::resolve(&args.data)?)?
    };
    let ds = std::sync::Arc::new(runtime.block_on(dataset::source::Dataset::open(store))?);
    let augment = if args.no_augment {
        Augment::none()
    } else {
        Augment::symmetries()
    };
    let images = args.images.min(ds.train.len());
    eprintln!("reading {images} images of {} ...", args.data);
    let t = bench::data_pipeline(ds, images, args.batch_size, args.image_size, augment, &device)?;
    println!("| {:<44} | {:>9} |", "stage", "images/s");
    println!("|{:-<46}|{:->11}|", "", "");
    println!(
        "| {:<44} | {:>9.0} |",
        "read + decode (prefetch thread)", t.read_decode
    );
    let full = format!(
        "+ upload, resize to {0}x{0}{1}",
        args.image_size,
        if args.no_augment { "" } else { ", augment" }
    );
    println!("| {full:<44} | {:>9.0} |", t.full);
    Ok(())
}

fn run_bench_model(args: BenchModelArgs) -> Result<()> {
    use bench::Workload;
    let cfg = EfficientNetConfig::from_name(&args.model)?;
    let selected = args.device.choice().select()?;
    let device = selected.device;
    let (b, s) = (args.batch_size, args.image_size);
    let backend = match args.device.gpu {
        Some(_) => format!("burn {}", selected.name),
        None => format!("burn {} (cpu)", args.device.cpu_backend.name()),
    };
    let mut rows = Vec::new();
    let chosen = Workload::ALL
        .into_iter()
        .filter(|w| args.workloads.is_empty() || args.workloads.iter().any(|n| n == w.name()));
    for workload in chosen {
        eprintln!(
            "measuring {} at batch {b}, {s} px: {} ...",
            cfg.name,
            workload.describe()
        );
        rows.push((
            workload,
            bench::model(&cfg, workload, b, s, args.warmup, args.iters, &device)?,
        ));
    }
    let torch = match args.torch.as_str() {
        "no" => None,
        _ if cfg.name != "efficientnet-b0" => None,
        mode => torch_reference(
            &args.python,
            b,
            s,
            args.warmup,
            args.iters,
            args.device.gpu.is_some(),
        )
        .or_else(|e| {
            if mode == "yes" {
                Err(e)
            } else {
                eprintln!("pytorch reference skipped: {e:#}");
                Ok(None)
            }
        })?,
    };
    let (values, copy_secs) = bench::gradient_copies(&cfg, args.iters, &device)?;
    let report = ModelBench {
        model: cfg.name.clone(),
        batch: b,
        size: s,
        backend,
        torch,
        rows,
        gradient_values: values,
        gradient_copy_seconds: copy_secs,
    };
    if args.json {
        report.print_json()
    } else {
        report.print_table(args.epoch_images);
        Ok(())
    }
}

/// What `worker bench model` measured, with PyTorch's numbers when it ran beside.
struct ModelBench {
    model: String,
    batch: usize,
    size: usize,
    /// Our backend, as the table heads its column.
    backend: String,
    /// PyTorch's name and its JSON (images per second by workload), when it ran.
    torch: Option<(String, serde_json::Value)>,
    rows: Vec<(bench::Workload, bench::Throughput)>,
    /// Gradient values copied into one buffer and back around each all-reduce.
    gradient_values: usize,
    gradient_copy_seconds: f64,
}

impl ModelBench {
    /// PyTorch's images per second for `workload`, when it ran.
    fn theirs(&self, workload: bench::Workload) -> Option<f64> {
        self.torch.as_ref().and_then(|(_, v)| v[workload.name()].as_f64())
    }

    /// The whole report as JSON on stdout.
    fn print_json(&self) -> Result<()> {
        let (rows, torch, b, s) = (&self.rows, &self.torch, self.batch, self.size);
        let workloads: Vec<serde_json::Value> = rows
            .iter()
            .map(|(w, t)| {
                let theirs = self.theirs(*w);
                serde_json::json!({
                    "workload": w.name(),
                    "images_per_second": t.images_per_sec,
                    "seconds_per_step": t.secs_per_iter,
                    "transfer_seconds_per_step": t.transfer_secs_per_iter,
                    "downloads_per_step": t.downloads_per_iter,
                    "uploads_per_step": t.uploads_per_iter,
                    "torch_images_per_second": theirs,
                    "ratio": theirs.map(|r| t.images_per_sec / r),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": self.model, "batch": b, "image_size": s, "backend": self.backend,
                "torch": torch.as_ref().map(|(name, _)| name.clone()),
                "gradient_values": self.gradient_values, "gradient_round_trip_seconds": self.gradient_copy_seconds,
                "workloads": workloads,
            }))?
        );
        Ok(())
    }

    /// The table beside PyTorch, with epoch times for `epoch` images.
    fn print_table(&self, epoch: usize) {
        let (rows, torch, b, s, backend) = (&self.rows, &self.torch, self.batch, self.size, &self.backend);
        println!(
            "{} at batch {b}, {s} px; epoch time for {epoch} images (no evaluation)\n",
            self.model
        );
        let torch_name = torch.as_ref().map_or("", |(name, _)| name.as_str());
        let tw = torch_name.len().max(16);
        let bw = backend.len().max(16);
        println!(
            "| {:<30} | {backend:>bw$} | {:>13} | {:>11} | {:>11} | {torch_name:>tw$} | {:>13} | {:>7} |",
            "workload", "epoch", "host copies", "copy ms", "epoch", "ratio"
        );
        println!(
            "|{:-<32}|{:->b$}|{:->15}|{:->13}|{:->13}|{:->w$}|{:->15}|{:->9}|",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            b = bw + 2,
            w = tw + 2
        );
        let hms = |rate: f64| {
            let secs = (epoch as f64 / rate).round() as u64;
            format!("{}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
        };
        for (workload, t) in rows {
            let ours = t.images_per_sec;
            let theirs = self.theirs(*workload);
            let (rate, time, ratio) = match theirs {
                Some(r) => (format!("{r:.2} img/s"), hms(r), format!("{:.2}x", ours / r)),
                None => (String::new(), String::new(), String::new()),
            };
            println!(
                "| {:<30} | {:>bw$} | {:>13} | {:>11} | {:>11} | {rate:>tw$} | {time:>13} | {ratio:>7} |",
                workload.describe(),
                format!("{ours:.2} img/s"),
                hms(ours),
                format!("{} down {} up", t.downloads_per_iter, t.uploads_per_iter),
                format!("{:.2}", t.transfer_secs_per_iter * 1e3),
            );
        }
        println!(
            "\ngradients into one buffer and back (around each all-reduce): {} values, {:.1} ms",
            self.gradient_values,
            self.gradient_copy_seconds * 1e3
        );
        let rate = |w: bench::Workload| rows.iter().find(|(x, _)| *x == w).map(|(_, t)| t.images_per_sec);
        if let (Some(cached), Some(uncached)) = (
            rate(bench::Workload::CachedHeadStep),
            rate(bench::Workload::HeadStep),
        ) {
            println!("\nphase 1 step, cached over uncached: {:.0}x", cached / uncached);
        }
    }
}

/// Run the embedded PyTorch script with `python`: its name and the JSON it printed.
fn torch_reference(
    python: &str,
    batch: usize,
    size: usize,
    warmup: usize,
    iters: usize,
    gpu: bool,
) -> Result<Option<(String, serde_json::Value)>> {
    use std::io::Write;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut child = std::process::Command::new(python)
        .args([
            "-",
            &batch.to_string(),
            &size.to_string(),
            &warmup.to_string(),
            &iters.to_string(),
            &threads.to_string(),
            if gpu { "cuda" } else { "cpu" },
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {python} (--python)"))?;
    child
        .stdin
        .take()
        .context("python stdin")?
        .write_all(TORCH_BENCH.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!(
            "{python} torch benchmark failed: {}",
            err.lines().last().unwrap_or("no output")
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("torch benchmark output is not JSON")?;
    for w in bench::Workload::ALL {
        if !v[w.name()].is_f64() {
            bail!("torch benchmark output lacks '{}': {v}", w.name());
        }
    }
    Ok(Some((
        format!(
            "pytorch {} {}",
            v["torch"].as_str().unwrap_or("?"),
            v["device"].as_str().unwrap_or("cpu")
        ),
        v,
    )))
}

/// A multi-threaded runtime for the cluster commands. Dropped with `shutdown_background`, so
/// that a training thread still running after an error does not hold the exit.
fn cluster_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "worker".into())
}

fn join_options(cluster: &ClusterArgs, device_name: &str) -> Result<JoinOptions> {
    if !(cluster.connect_timeout.is_finite() && cluster.connect_timeout > 0.0) {
        bail!("--connect-timeout must be a positive number of seconds");
    }
    if !(cluster.coordinator_timeout.is_finite() && cluster.coordinator_timeout > 0.0) {
        bail!("--coordinator-timeout must be a positive number of seconds");
    }
    Ok(JoinOptions {
        coordinator: cluster.coordinator.clone(),
        token: cluster.security.token()?,
        tls: cluster.security.tls(),
        advertise: cluster.advertise.clone(),
        name: cluster
            .name
            .clone()
            .unwrap_or_else(|| format!("{}/{device_name}", host_name())),
        connect_timeout: std::time::Duration::from_secs_f64(cluster.connect_timeout),
        coordinator_timeout: std::time::Duration::from_secs_f64(cluster.coordinator_timeout),
        metrics_listen: None,
    })
}

fn run_join(args: JoinArgs) -> Result<()> {
    let device::Selected {
        device,
        name: device_name,
    } = args.device.choice().select()?;
    tracing::info!(device = %device_name, "device");
    let options = JoinOptions {
        metrics_listen: args.metrics_listen,
        ..join_options(&args.cluster, &device_name)?
    };
    let runtime = cluster_runtime()?;
    let result = runtime.block_on(worker::cluster::join(options, device, device_name));
    runtime.shutdown_background();
    let outcome = result?;
    print_bench_rows(&outcome);
    Ok(())
}

fn print_bench_rows(outcome: &JoinOutcome) {
    if outcome.bench.is_empty() {
        return;
    }
    let rows: Vec<collective::bench::Row> = outcome
        .bench
        .iter()
        .map(|r| collective::bench::Row {
            bytes: r.bytes,
            median_seconds: r.median_seconds,
            algbw_gbps: r.algbw_gbps,
            busbw_gbps: r.busbw_gbps,
        })
        .collect();
    print_allreduce_table(outcome.world as usize, &rows, None);
}

fn print_allreduce_table(world: usize, rows: &[collective::bench::Row], loopback: Option<f64>) {
    println!("all-reduce, ring of {world} over gRPC");
    println!(
        "| {:>9} | {:>10} | {:>11} | {:>11} |",
        "size", "median ms", "algbw GB/s", "busbw GB/s"
    );
    println!("|{:->11}|{:->12}|{:->13}|{:->13}|", "", "", "", "");
    for row in rows {
        println!(
            "| {:>6} MB | {:>10.2} | {:>11.3} | {:>11.3} |",
            format!("{:.0}", row.bytes as f64 / (1u64 << 20) as f64),
            row.median_seconds * 1e3,
            row.algbw_gbps,
            row.busbw_gbps
        );
    }
    if let Some(gbps) = loopback {
        println!("one loopback TCP stream (the ceiling): {gbps:.2} GB/s");
    }
}

fn run_bench_allreduce(args: BenchAllreduceArgs) -> Result<()> {
    let runtime = cluster_runtime()?;
    let result = match (args.local, &args.coordinator) {
        (Some(n), _) => {
            if n == 0 {
                bail!("--local needs at least 1 rank");
            }
            if args.size_mb.iter().any(|mb| !(mb.is_finite() && *mb > 0.0)) || args.iterations == 0 {
                bail!("--size-mb values must be positive and --iterations at least 1");
            }
            let plan = collective::bench::Plan {
                sizes: args
                    .size_mb
                    .iter()
                    .map(|mb| (mb * 1048576.0).round() as u64)
                    .collect(),
                warmup: args.warmup,
                iterations: args.iterations,
            };
            runtime.block_on(async {
                let rows = collective::bench::local_ring(n, &plan, args.bf16)
                    .await
                    .map_err(|e| anyhow::anyhow!(e))?;
                let largest = plan.sizes.iter().copied().max().unwrap_or(1 << 20);
                let loopback = collective::bench::loopback_tcp(largest).await?;
                print_allreduce_table(n, &rows, Some(loopback));
                Ok(())
            })
        }
        (None, Some(coordinator)) => {
            let cluster = ClusterArgs {
                coordinator: coordinator.clone(),
                advertise: args.advertise.clone(),
                name: None,
                connect_timeout: 60.0,
                // A benchmark is not resumed: a lost coordinator ends it soon.
                coordinator_timeout: 10.0,
                security: args.security.clone(),
            };
            let options = join_options(&cluster, "cpu")?;
            runtime
                .block_on(worker::cluster::join(
                    options,
                    device::cpu(device::CpuBackend::Flex)?,
                    "cpu".into(),
                ))
                .map_err(anyhow::Error::from)
                .map(|outcome| print_bench_rows(&outcome))
        }
        (None, None) => Err(anyhow::anyhow!("pass --local N or --coordinator URL")),
    };
    runtime.shutdown_background();
    result
}
