"""The README and docs/*.md as tests: every fenced code block either runs here, against tiny trained
runs, or says why it does not; a block that says neither fails the suite, so a new example cannot go
untested without a reason.

The marker is an HTML comment (invisible on GitHub) on the line right before the opening fence:

    <!-- not run: REASON -->        not run; the reason is required (a GPU, an install, a long job, a diagram)
    <!-- run -->                    run as written
    <!-- run: VARIANT | VARIANT -->  run once per variant; a variant is `as written`, or directives
                                    separated by `;`:
        OLD => NEW                  the block with NEW for OLD (OLD must occur in the block), e.g.
                                    `configs/ddpm.py => configs/ddpm.py:runlocal` for the tiny config
        names from WORKDIR          (python) the tiny run the names below come from (default runs/default)

Where blocks run: a sandbox folder holding two tiny runs trained once per module, `runs/default`
(VDM, `vdm:runlocal`, the main job's method) and `runs/ddpm` (DDPM, `ddpm:runlocal` with T = 100 and
a learned variance, so that the README's DDIM, respacing and learned_range examples apply), both with
a one-level UNet (it compiles in half the time), and links to the repo's train.py, sample.py and
configs/; so commands that name those workdirs run as written.

- python blocks run in this process (cwd the sandbox) with the names they assume: `x0` (4 test
  images), `t` (a DDPM's steps, VDM's t in [0, 1]), `noise`, `x_t` (x0 noised to t), `rng`,
  `model_fn` (the run's network); they fail the test if they raise.
- bash blocks run with bash -e (one subprocess per block) and fail the test on a non-zero exit.
- text blocks are transcripts: each `$ command` runs, and every line shown under it must be in its
  output (the exit status is what the transcript shows, so it is not checked).
"""

import dataclasses
import glob
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
MARKER = re.compile(r"^<!--\s*(not run|run)\s*(?::(.*?))?\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
LANGUAGES = ("python", "bash", "text")
TINY_RUNS = ("runs/default", "runs/ddpm")
LINKED = ("train.py", "sample.py", "configs")  # what the sandbox takes from the repo
SHELL_TIMEOUT = 600


@dataclasses.dataclass(frozen=True)
class Block:
    path: str  # relative to the repo
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: str | None  # "run", "not run" or None
    spec: str  # what follows the colon

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclasses.dataclass(frozen=True)
class Variant:
    substitutions: tuple[tuple[str, str], ...] = ()
    names_from: str = "runs/default"

    def apply(self, text: str) -> str:
        for old, new in self.substitutions:
            text = text.replace(old, new)
        return text


def read_blocks(path: str) -> list[Block]:
    """The fenced code blocks of a markdown file, with the marker on the line before each."""
    lines = open(os.path.join(ROOT, path), encoding="utf-8").read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, indent = i, m.group(1)
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path}:{start + 1}: a code block that is never closed")
        marker = MARKER.match(lines[start - 1].strip()) if start else None
        blocks.append(
            Block(
                path=path,
                line=start + 1,
                lang=m.group(2),
                text="\n".join(body) + "\n",
                marker=marker.group(1) if marker else None,
                spec=(marker.group(2) or "").strip() if marker else "",
            )
        )
        i += 1
    return blocks


def variants(block: Block) -> list[Variant]:
    """The variants of a run marker; ValueError for a directive that is not one."""
    out = []
    for part in (block.spec or "as written").split("|"):
        subs, names_from = [], "runs/default"
        part = part.strip()
        for item in [] if part == "as written" else [x.strip() for x in part.split(";") if x.strip()]:
            if item.startswith("names from "):
                names_from = item[len("names from ") :].strip()
            elif "=>" in item:
                old, new = (x.strip() for x in item.split("=>", 1))
                subs.append((old, new))
            else:
                raise ValueError(f"{block.where}: {item!r} is neither `OLD => NEW` nor `names from WORKDIR`")
        out.append(Variant(tuple(subs), names_from))
    return out


BLOCKS = [b for path in DOCS for b in read_blocks(path)]
RUN = [(b, i, v) for b in BLOCKS if b.marker == "run" for i, v in enumerate(variants(b))]


def test_every_block_says_whether_it_runs():
    """A block with neither marker fails here: mark it `<!-- run -->` (and see it pass) or
    `<!-- not run: why -->`."""
    assert len(BLOCKS) >= 20 and {b.path for b in BLOCKS} >= {"README.md", "docs/architecture.md"}, BLOCKS
    unmarked = [f"{b.where} ({b.lang or 'no language'})" for b in BLOCKS if b.marker is None]
    assert not unmarked, "blocks with neither <!-- run --> nor <!-- not run: REASON --> before them: " + ", ".join(
        unmarked
    )
    no_reason = [b.where for b in BLOCKS if b.marker == "not run" and len(b.spec) < 5]
    assert not no_reason, f"<!-- not run --> needs its reason (<!-- not run: needs a GPU -->): {no_reason}"
    for b, _, v in RUN:
        assert b.lang in LANGUAGES, f"{b.where}: a block that runs is one of {LANGUAGES}, not {b.lang!r}"
        stale = [old for old, _ in v.substitutions if old not in b.text]
        assert not stale, f"{b.where}: the marker substitutes {stale}, which the block no longer holds"
        assert v.names_from in TINY_RUNS, f"{b.where}: names from {v.names_from!r}; the tiny runs are {TINY_RUNS}"


def test_the_marker_reader():
    block = Block("x.md", 3, "bash", "python train.py --config=configs/ddpm.py\n", "run", "")
    assert variants(block) == [Variant()]
    spec = "as written | configs/ddpm.py => configs/ddpm.py:runlocal; names from runs/ddpm"
    two = variants(dataclasses.replace(block, spec=spec))
    assert two[0] == Variant() and two[1].names_from == "runs/ddpm"
    assert two[1].apply(block.text) == "python train.py --config=configs/ddpm.py:runlocal\n"
    with pytest.raises(ValueError, match="neither"):
        variants(dataclasses.replace(block, spec="use the GPU"))
    assert MARKER.match("<!-- not run: needs a GPU -->").groups() == ("not run", " needs a GPU")
    assert MARKER.match("<!-- run -->").group(1) == "run"


# ----------------------------------------------------------------------------- the tiny runs


def tiny_configs(data_dir) -> dict:
    from ddpm_jax import configuration
    from ddpm_jax.configs import ddpm as ddpm_config
    from ddpm_jax.configs import vdm as vdm_config

    vdm = vdm_config.get_config("runlocal")
    ddpm = ddpm_config.get_config("runlocal")
    ddpm_overrides = {
        "diffusion.num_timesteps": 100,  # the README's DDIM 50 and respaced 100 steps fit in T
        "diffusion.variance": "learned_range",  # the core example's model_fn: eps and the variance
        "diffusion.loss_type": "hybrid",
    }
    for k, v in ddpm_overrides.items():
        configuration.set_field(ddpm, k, v)
    for config in (vdm, ddpm):
        config.data.data_dir = data_dir
        config.model.ch_mult, config.model.attn_resolutions = (1,), ()  # compiles in half the time
        config.training.bpd_batch_size = 300  # the final bound over the 297 test images in one batch
    return {"runs/default": vdm, "runs/ddpm": ddpm}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, data_dir, steps_for):
    """A folder with runs/default (VDM) and runs/ddpm (DDPM), trained in this process, and links
    to the repo's entry points and configs."""
    from ddpm_jax.training import loop

    root = tmp_path_factory.mktemp("docs")
    for name in LINKED:
        os.symlink(os.path.join(ROOT, name), root / name)
    for workdir, config in tiny_configs(data_dir).items():
        loop.train_and_evaluate(config, str(root / workdir), steps=steps_for(config))
    return root


def names_for(workdir: str) -> dict:
    """What the README's Python blocks assume, from a tiny run: x0 (4 test images), t, noise, x_t
    (x0 noised to t by the run's schedule), rng, model_fn."""
    import jax.numpy as jnp

    import ddpm_jax
    from ddpm_jax.data import splits

    run = ddpm_jax.load_run(workdir)
    x0 = jnp.asarray(splits.load_split(run.config, "test")[:4], jnp.float32) / 127.5 - 1.0
    rng = jax.random.PRNGKey(0)
    k_t, k_noise = jax.random.split(rng)
    schedule = run.noise_schedule
    if schedule.discrete:
        t = jax.random.randint(k_t, (4,), 0, len(schedule.t))
    else:
        t = jax.random.uniform(k_t, (4,))
    noise = jax.random.normal(k_noise, x0.shape)
    log_snr = jnp.interp(t.astype(jnp.float32), schedule.t, schedule.log_snr)[:, None, None, None]
    x_t = jnp.sqrt(jax.nn.sigmoid(log_snr)) * x0 + jnp.sqrt(jax.nn.sigmoid(-log_snr)) * noise
    return {"x0": x0, "t": t, "noise": noise, "x_t": x_t, "rng": rng, "model_fn": run.model_fn}


def shell_env() -> dict:
    """This interpreter's python first on PATH, and this checkout importable."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def transcript(text: str) -> list[tuple[str, list[str]]]:
    """A text block's `$ command` lines, each with the output lines shown under it."""
    out = []
    for line in text.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out and line.strip():
            out[-1][1].append(line.strip())
    return out


def _normal(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.slow
@pytest.mark.parametrize(
    "block,variant", [(b, v) for b, _, v in RUN], ids=[f"{b.where}#{i}" if i else b.where for b, i, _ in RUN]
)
def test_block_runs(block, variant, sandbox, monkeypatch, capsys):
    monkeypatch.chdir(sandbox)
    text = variant.apply(block.text)
    if block.lang == "python":
        namespace = {"__name__": "__docs__", **names_for(str(sandbox / variant.names_from))}
        exec(compile(text, block.where, "exec"), namespace)
        return
    if block.lang == "bash":
        proc = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", text],
            env=shell_env(),
            capture_output=True,
            text=True,
            timeout=SHELL_TIMEOUT,
        )
        assert proc.returncode == 0, f"{block.where} exited {proc.returncode}:\n{text}\n{proc.stderr[-4000:]}"
        return
    commands = transcript(text)
    assert commands, f"{block.where}: a text block that runs is a transcript of `$ command` lines"
    for command, shown in commands:
        proc = subprocess.run(
            ["bash", "-c", command], env=shell_env(), capture_output=True, text=True, timeout=SHELL_TIMEOUT
        )
        output = _normal(proc.stdout + proc.stderr)
        missing = [line for line in shown if _normal(line) not in output]
        assert not missing, f"{block.where}: `{command}` no longer prints {missing}; it printed:\n{output[-4000:]}"


# ----------------------------------------------------------------------------- what the blocks show


@pytest.mark.slow
@pytest.mark.parametrize("workdir", TINY_RUNS)
def test_a_run_says_what_it_is_whatever_its_method(workdir, sandbox, tmp_path):
    import ddpm_jax
    from ddpm_jax.core import schedules

    run = ddpm_jax.load_run(str(sandbox / workdir))
    schedule = run.noise_schedule
    assert run.parameterization == "eps" and run.method_name == run.config.method
    assert np.all(np.diff(schedule.log_snr) < 0) and schedule.t.shape == schedule.log_snr.shape
    text = str(run)
    assert f"{run.method_name} run at step 4" in text and "log SNR" in text and str(schedule) in text
    assert repr(run).startswith("<Run ") and len(repr(run)) < 200
    if schedule.discrete:  # the DDPM: one value per step, and run.schedule is still the core's Schedule
        assert isinstance(run.schedule, schedules.Schedule) and len(schedule.t) == run.schedule.num_timesteps == 100
        assert "linear schedule (100 steps, t = 0..99)" in str(schedule)
    else:  # VDM: -gamma on the grid of run.schedule
        np.testing.assert_allclose(schedule.log_snr, -np.asarray(run.schedule["gamma"]), rtol=1e-6)
        assert schedule.t[0] == 0 and schedule.t[-1] == 1 and "continuous t in [0, 1]" in str(schedule)
        assert str(schedule).startswith("fixed linear gamma (VDM) schedule")
    png = schedule.plot(str(tmp_path / "noise_schedule.png"))
    assert Image.open(png).size[0] >= 400


def test_a_vae_has_no_noise_schedule():
    from ddpm_jax import methods
    from ddpm_jax.configs import vae as vae_config

    method = methods.from_config(vae_config.get_config("runlocal"))
    assert method.noise_schedule(None) is None and method.describe().get("parameterization") is None
    assert method.loss_unit() == "bits/dim"


@pytest.mark.slow
@pytest.mark.parametrize("workdir", TINY_RUNS)
def test_run_sample_stays_in_the_documented_range(workdir, sandbox, monkeypatch):
    import jax.numpy as jnp

    import ddpm_jax

    run = ddpm_jax.load_run(str(sandbox / workdir))
    images = run.sample(16, seed=0, sampler="ddim", num_steps=10)
    assert images.shape == (16, 8, 8, 1) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0, (images.min(), images.max())
    images = run.sample(4, seed=1)  # the default sampler (VDM's ancestral chain ends on the 256 bins)
    assert images.min() >= -1.0 and images.max() <= 1.0, (images.min(), images.max())
    # Whatever a sampler returns (VDM's top bin came out at 1.0000001), run.sample keeps to [-1, 1].
    over = jnp.asarray([1.0000001, -1.0000001, 0.5], jnp.float32).reshape(3, 1, 1, 1)
    monkeypatch.setattr(run.method, "sample", lambda *args, **kwargs: {"samples": over})
    np.testing.assert_array_equal(run.sample(3)[:, 0, 0, 0], np.float32([1.0, -1.0, 0.5]))


# ----------------------------------------------------------------------------- the pictures


def test_the_grid_png_is_scaled_up_and_the_npz_stays_raw(tmp_path):
    from ddpm_jax import fileio
    from ddpm_jax.evaluation import plots

    samples = np.random.default_rng(0).uniform(-1, 1, (64, 8, 8, 1)).astype(np.float32)
    fileio.save_npz(tmp_path / "samples.npz", samples=samples)
    plots.save_grid(samples, tmp_path / "samples.png")
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["samples"], samples)  # the arrays, unchanged
    png = np.asarray(Image.open(tmp_path / "samples.png"))
    sep, scale = plots.SEPARATOR, 8  # 8 columns of 8 pixels: 8x to reach 512 px
    assert png.shape == (8 * (8 * scale + sep) + sep,) * 2 == (530, 530)
    pixels = plots.unscale_images(samples)[..., 0]
    for i in (0, 9, 63):
        r, q = divmod(i, 8)
        top, left = sep + r * (8 * scale + sep), sep + q * (8 * scale + sep)
        cell = png[top : top + 8 * scale, left : left + 8 * scale]
        np.testing.assert_array_equal(cell, np.kron(pixels[i], np.ones((scale, scale), np.uint8)))  # nearest
    assert (png[:sep] == plots.SEPARATOR_VALUE).all() and (png[:, 8 * scale + sep] == plots.SEPARATOR_VALUE).all()
    # A bigger grid needs less scaling, but stays at least PICTURE_WIDTH wide; TensorBoard's stays at pixel size.
    wide = plots.grid_picture(np.zeros((500, 8, 8, 1)))
    assert plots.PICTURE_WIDTH <= wide.shape[1] < 2 * plots.PICTURE_WIDTH
    assert plots.image_grid(samples).shape == (73, 73, 1)


def test_the_strip_labels_each_column_with_its_t(tmp_path):
    from ddpm_jax.evaluation import plots

    frames = np.random.default_rng(0).uniform(-1, 1, (10, 8, 8, 8, 1)).astype(np.float32)
    frame_t = np.arange(249, -1, -1)[np.linspace(0, 249, 10).round().astype(int)] / 250  # VDM's 250-step chain
    labelled = plots.strip_picture(frames, frame_t)
    body = plots.grid_picture(frames.transpose(1, 0, 2, 3, 4).reshape((80, 8, 8, 1)), ncol=10)
    np.testing.assert_array_equal(labelled[-body.shape[0] :], body)
    band = labelled[: -body.shape[0]]
    assert band.shape[0] >= 20 and (band < 128).any()  # dark text on white
    assert [plots.frame_label(t) for t in frame_t[[0, -1]]] == ["t=0.996", "t=0"]
    assert [plots.frame_label(t) for t in np.array([99, 0])] == ["t=99", "t=0"]
    # Every column's label lies above its column: some ink over each cell.
    cell = (body.shape[1] - plots.SEPARATOR) // 10
    for i in range(10):
        assert (band[-band.shape[0] // 2 :, plots.SEPARATOR + i * cell : (i + 1) * cell] < 128).any(), i
    plots.save_strip(frames, tmp_path / "strip.png", frame_t=frame_t)
    assert Image.open(tmp_path / "strip.png").size == (labelled.shape[1], labelled.shape[0])


def test_loss_png_says_its_units(monkeypatch):
    import matplotlib.pyplot as plt

    from ddpm_jax.evaluation import plots

    saved = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: saved.append(fig) or path)
    records = [{"step": s, "loss": 8.0 / s} for s in range(1, 50)]
    records.append({"step": 49, "test_loss": 0.3, "test_bpd_est": 5.0})
    plots.plot_loss(records, "loss.png")  # VDM, the VAEs, a DDPM on the bound
    plots.plot_loss(records, "loss.png", loss_unit="MSE of the eps target")  # a DDPM on L_simple
    bpd, mse = saved
    (ax,) = bpd.axes
    assert ax.get_ylabel() == "bits/dim (log scale)" and ax.get_xlabel() == "training step"
    assert ax.get_yscale() == "log" and ax.get_legend() is not None
    left, right = mse.axes
    assert left.get_ylabel() == "MSE of the eps target (log scale)" and left.get_xlabel() == "training step"
    assert right.get_ylabel() == "bits/dim (log scale)" and right.get_xlabel() == "training step"
    plt.close("all")


@pytest.mark.slow
def test_the_tiny_runs_pictures(sandbox):
    """samples.png shows samples.npz's arrays, scaled up; the strip, the loss and (DDPM) the bound terms exist."""
    from ddpm_jax.evaluation import plots

    for workdir in TINY_RUNS:
        folder = sandbox / workdir
        samples = np.load(folder / "samples.npz")["samples"]
        assert samples.shape == (8, 8, 8, 1) and samples.dtype == np.float32
        png = np.asarray(Image.open(folder / "samples.png"))
        np.testing.assert_array_equal(png, plots.grid_picture(samples)[..., 0])
        assert png.shape[1] >= plots.PICTURE_WIDTH
        for name in ("denoising_strip.png", "loss.png"):
            assert Image.open(folder / name).size[0] >= plots.PICTURE_WIDTH, (workdir, name)
    assert os.path.exists(sandbox / "runs/ddpm/bpd_terms.png")
    assert math.isfinite(float(np.load(sandbox / "runs/default/samples.npz")["samples"].sum()))
