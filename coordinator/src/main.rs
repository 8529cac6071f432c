//! `coordinator`: starts and watches effnet-cluster runs.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use cluster_proto::auth::{ClientAuth, Token};
use cluster_proto::net;
use cluster_proto::v1::StatusRequest;
use cluster_proto::v1::coordinator_client::CoordinatorClient;
use coordinator::cli::{Cli, Command, StartArgs, StatusArgs};
use coordinator::run::{Run, Stage};
use coordinator::{ServeOptions, serve};
use run_config::{Job, RunConfig};
use tracing_subscriber::EnvFilter;

fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_env("COORDINATOR_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let log_format = cli.log_format.clone();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Start(args) => start(*args, &log_format).await,
            Command::Status(args) => status(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `coordinator start`: check the flags, bind, take the checkpoint root's lease (resuming
/// when it holds a checkpoint), start the local workers when `--local`, serve the run to its
/// end and write its outputs. One sequence on purpose (about 120 lines): its order is the
/// guarantee that a start rejected for any reason leaves nothing behind (no lease, no
/// spawned worker, no token file).
async fn start(args: StartArgs, log_format: &str) -> Result<()> {
    let mut config = args
        .run
        .resolve()
        .map_err(|e| anyhow!("invalid run configuration: {e}"))?;
    log_config_notes(&config);
    let (workers, max_workers) = check_args(&args, &config)?;
    // Set by --out / CLUSTER_OUT, or by the run file.
    let out_given = args.run.out.is_some() || config.out != RunConfig::default().out;
    if !out_given && config.job == Job::Train {
        // Each run gets its own directory unless told otherwise.
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        config.out = format!("runs/run-{stamp}");
    }
    let token = match (args.local, args.security.token()) {
        (_, Ok(token)) => token,
        (Some(_), Err(cluster_proto::Error::NoToken)) => {
            Token::random().context("cannot create a join token")?
        }
        (_, Err(e)) => return Err(e.into()),
    };
    let lease_ttl = Duration::from_secs_f64(args.lease_ttl);
    let listen = args.listen.unwrap_or_else(|| {
        if args.local.is_some() {
            SocketAddr::from(([127, 0, 0, 1], 0))
        } else {
            SocketAddr::from(([0, 0, 0, 0], 50051))
        }
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    // The TLS files are checked before the checkpoint root's lease is taken: a start that
    // fails on them must not leave a live lease behind for the corrected one to wait out.
    args.security.tls().server().context("TLS")?;
    let local_binary = match args.local {
        Some(_) => {
            let binary =
                coordinator::local::worker_binary(args.worker_bin.as_deref()).map_err(|e| anyhow!(e))?;
            let token_path = coordinator::local::write_token(std::path::Path::new(&config.out), &token)
                .map_err(|e| anyhow!(e))?;
            tracing::info!(path = %token_path.display(),
                "join token written (mode 0600): coordinator status --token-file reaches this run");
            Some(binary)
        }
        None => None,
    };
    // Resume or start fresh before any worker is started: a checkpoint root that cannot be
    // read, or one of another run, stops here with nothing spawned.
    let prepared = coordinator::checkpoints::prepare(config.clone(), workers, args.fresh, lease_ttl)
        .await
        .context("checkpoints")?;
    let (children, supervisor) = match (args.local, local_binary) {
        (Some(n), Some(binary)) => {
            let address = listener.local_addr().context("listener address")?.to_string();
            let (children, local) = start_local_workers(&args, n, binary, address, &token, log_format)?;
            tracing::info!(workers = n, worker_bin = %local.binary.display(), out = %config.out,
                cpu_threads_each = %local.cpu_threads.map_or("as the environment says".into(), |t| t.to_string()),
                "local workers started");
            (children, Some(local))
        }
        _ => (Vec::new(), None),
    };
    let options = ServeOptions {
        workers,
        min_workers: args.min_workers,
        max_workers,
        token,
        tls: args.security.tls(),
        heartbeat_timeout: Duration::from_secs_f64(args.heartbeat_timeout),
        step_timeout: coordinator::stuck::StepTimeout::from_seconds(args.step_timeout),
        linger: Duration::from_secs(5),
        // A bar on a terminal; structured logs only when piped or with JSON logs.
        progress: log_format == "text" && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let job = config.job;
    let (failed_tx, mut failed_rx) = tokio::sync::mpsc::channel::<String>(1);
    let restarts = args.max_restarts;
    let watcher = tokio::spawn(async move {
        if let Some(workers) = supervisor {
            let reason = coordinator::local::supervise(workers, children, restarts).await;
            let _ = failed_tx.send(reason).await;
        }
    });
    let interrupt = async move {
        tokio::select! {
            Ok(()) = tokio::signal::ctrl_c() => "the coordinator was interrupted".to_string(),
            Some(reason) = failed_rx.recv() => reason,
            else => std::future::pending::<String>().await,
        }
    };
    let metrics_listener = match args.metrics_listen {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen for metrics on {address}"))?,
        ),
        None => None,
    };
    let outcome = serve(prepared, options, listener, metrics_listener, interrupt).await;
    // Local workers exit on their own once told the run is over (serve waits for them to
    // hang up); dropping the watcher kills any left.
    watcher.abort();
    let run = outcome?.run;
    if job == Job::AllreduceBench {
        print_bench(&run);
    }
    if job == Job::Train && !run.history.is_empty() {
        coordinator::report::write_outputs(&run).map_err(|e| anyhow!(e))?;
        tracing::info!(out = %run.config.out, "outputs written");
    }
    match run.stage {
        Stage::Done => Ok(()),
        _ => Err(anyhow!(
            run.error.unwrap_or_else(|| "the run did not finish".into())
        )),
    }
}

/// Say what a configuration does that its flags alone may not make plain.
fn log_config_notes(config: &RunConfig) {
    if config.job == Job::Train && config.from_scratch() {
        // A random backbone frozen in inference mode passes almost nothing on, and a head
        // trained on it stays at chance (10% on ten classes): say what runs instead.
        tracing::info!(
            lr = config.lr_head,
            epochs = config.head_epochs,
            "--weights none: no pretrained features to freeze, so phase 1 trains the whole network \
             from scratch (BatchNorm in training mode, no feature cache) at --lr-head; \
             phase 2 then fine-tunes with BatchNorm frozen as usual"
        );
    }
    if let Some(passes) = config.head_passes_per_image()
        && config.augment
        && config.head_variants > 1
        && passes > f64::from(config.head_epochs) / 4.0
    {
        // The cache cannot make these epochs much faster: say so, and what would.
        tracing::info!(
            head_epochs = config.head_epochs,
            head_variants = config.head_variants,
            backbone_passes_per_image = format!("{passes:.1}"),
            "the feature cache saves little with this many augmentation variants per image; \
             --head-variants K caps the head phase at K backbone passes per image"
        );
    }
}

/// Reject flags that cannot run together, before anything is bound, written or spawned.
/// Returns the worker count and the largest ring.
fn check_args(args: &StartArgs, config: &RunConfig) -> Result<(usize, usize)> {
    let workers = args.local.unwrap_or(args.workers);
    if workers == 0 {
        bail!("--workers (or --local) must be at least 1");
    }
    if !args.gpus.is_empty() && args.gpus.len() != workers {
        bail!(
            "--gpus lists {} GPUs for {workers} local workers; give one per worker",
            args.gpus.len()
        );
    }
    if !(args.heartbeat_timeout.is_finite() && args.heartbeat_timeout > 0.0) {
        bail!("--heartbeat-timeout must be a positive number of seconds");
    }
    if !(args.step_timeout.is_finite() && args.step_timeout >= 0.0) {
        bail!("--step-timeout must be a number of seconds (0: derived from the step times)");
    }
    if !(args.lease_ttl.is_finite() && args.lease_ttl >= 1.0) {
        bail!("--lease-ttl must be at least 1 second");
    }
    if args.min_workers == 0 || args.min_workers > workers {
        bail!(
            "--min-workers must be between 1 and the worker count ({workers}), got {}",
            args.min_workers
        );
    }
    let max_workers = args.max_workers.unwrap_or(workers);
    if max_workers < workers {
        bail!("--max-workers {max_workers} is below the worker count ({workers})");
    }
    if config.global_batch > 0 && (config.global_batch as usize) < max_workers {
        bail!(
            "--global-batch {} is smaller than the largest ring ({max_workers} workers); every worker needs \
             at least one image per step",
            config.global_batch
        );
    }
    if args.local.is_some() && args.security.tls().enabled() {
        bail!("--local runs every process on this machine over loopback; drop the --tls-* options");
    }
    Ok((workers, max_workers))
}

/// Start the `n` workers of `--local` (their binary `binary`), told to join at `address`.
fn start_local_workers(
    args: &StartArgs,
    n: usize,
    binary: std::path::PathBuf,
    address: String,
    token: &Token,
    log_format: &str,
) -> Result<(Vec<tokio::process::Child>, coordinator::local::LocalWorkers)> {
    let local = coordinator::local::LocalWorkers {
        binary,
        gpus: args.gpus.clone(),
        backends: coordinator::local::Backends {
            gpu: args.gpu_backend.clone(),
            cpu: args.cpu_backend.clone(),
        },
        address,
        token: token.clone(),
        log_format: log_format.to_string(),
        metrics: args.metrics_listen,
        // The user's own thread settings win; otherwise the CPU workers share the cores.
        cpu_threads: coordinator::local::THREAD_VARIABLES
            .iter()
            .all(|v| std::env::var_os(v).is_none())
            .then(|| {
                let cores = std::thread::available_parallelism().map_or(1, usize::from);
                coordinator::local::cpu_threads(cores, n.saturating_sub(args.gpus.len()))
            }),
    };
    let children = local.spawn_all(n).map_err(|e| anyhow!(e))?;
    Ok((children, local))
}

fn print_bench(run: &Run) {
    let Some(bench) = &run.bench else { return };
    let n = run.expected;
    println!(
        "all-reduce over {n} workers (ring, {} values)",
        if run.config.bf16_allreduce { "bf16" } else { "f32" }
    );
    println!(
        "{:>10} {:>12} {:>12} {:>12}",
        "size", "median ms", "algbw GB/s", "busbw GB/s"
    );
    for row in &bench.rows {
        println!(
            "{:>10} {:>12.3} {:>12.3} {:>12.3}",
            format_bytes(row.bytes),
            row.median_seconds * 1e3,
            row.algbw_gbps,
            row.busbw_gbps
        );
    }
}

fn format_bytes(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

/// `1h 02m`, `3m 05s`, `42s`.
fn format_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, min, sec) => format!("{min}m {sec:02}s"),
        (h, min, _) => format!("{h}h {min:02}m"),
    }
}

async fn status(args: StatusArgs) -> Result<()> {
    let token = args.security.token()?;
    let endpoint = net::endpoint(&args.coordinator, args.security.tls().client()?)?;
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {}", args.coordinator))?;
    let mut client = CoordinatorClient::with_interceptor(channel, ClientAuth::new(&token));
    let reply = client
        .status(StatusRequest {})
        .await
        .map_err(|s| anyhow!("status refused: {}", s.message()))?
        .into_inner();
    if args.json {
        let workers: Vec<serde_json::Value> = reply
            .workers
            .iter()
            .map(|w| {
                serde_json::json!({"worker_id": w.worker_id, "name": w.name,
                    // u32::MAX on the wire: not in a ring yet.
                    "rank": (w.rank != u32::MAX).then_some(w.rank), "address": w.address,
                    "device": w.device, "step": w.step, "seconds_since_heartbeat": w.seconds_since_heartbeat,
                    "steps_per_second": w.steps_per_second, "images_per_second": w.images_per_second,
                    "step_seconds": (w.steps_per_second > 0.0).then(|| 1.0 / w.steps_per_second)})
            })
            .collect();
        let history: serde_json::Value = serde_json::from_str(&reply.history_json).unwrap_or_default();
        let value = serde_json::json!({"run_id": reply.run_id, "state": reply.state, "generation": reply.generation,
            "epoch": reply.epoch, "step": reply.step, "workers": workers, "history": history,
            "val_accuracy": reply.val_accuracy, "eta_seconds": reply.eta_seconds,
            "last_checkpoint": reply.last_checkpoint, "error": reply.error,
            "paused": (!reply.paused.is_empty()).then_some(&reply.paused)});
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "run {}: {} (ring generation {}, epoch {}, step {})",
            reply.run_id, reply.state, reply.generation, reply.epoch, reply.step
        );
        if !reply.paused.is_empty() {
            println!("  paused: {}", reply.paused);
        }
        if let Some(acc) = reply.val_accuracy {
            println!("  validation accuracy {:.2}%", acc * 100.0);
        }
        if let Some(eta) = reply.eta_seconds {
            println!("  about {} left", format_duration(eta));
        }
        if !reply.last_checkpoint.is_empty() {
            println!("  last checkpoint {}", reply.last_checkpoint);
        }
        for w in &reply.workers {
            let rank = if w.rank == u32::MAX {
                "-".to_string()
            } else {
                w.rank.to_string()
            };
            let speed = if w.steps_per_second > 0.0 {
                format!(
                    ", {:.3} s/step, {:.1} images/s",
                    1.0 / w.steps_per_second,
                    w.images_per_second
                )
            } else {
                String::new()
            };
            println!(
                "  {} rank {rank} {} {} step {}{speed} (heartbeat {:.1} s ago)",
                w.worker_id, w.address, w.device, w.step, w.seconds_since_heartbeat
            );
        }
        if !reply.error.is_empty() {
            println!("error: {}", reply.error);
        }
    }
    Ok(())
}
