"""What `caspo` does with bad input: one line on stderr naming the file, the line or field
and the fix, exit 2 (3 for a run that halted itself) -- never a traceback.

Each case runs the CLI in-process (`caspo_jax.launch.cli.main`) on the tiny test model
with one-step settings; data errors are raised before anything is compiled.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caspo_jax.demo.task import make_split, write_split
from caspo_jax.errors import RunHalted
from caspo_jax.launch.cli import main
from caspo_jax.launch.run_args import run_stage
from caspo_jax.models import save_pretrained
from caspo_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from caspo_jax.tiny.tokenizer import build_tiny_processor, build_tiny_tokenizer, save_tiny_processor, tokenizer_info
from caspo_jax.loop.setup import tiny_hf_config

TINY = ["--preset", "tiny-cpu", "--set", "model.tiny=test", "--set", "run.steps=1", "--set", "run.eval_every=0",
        "--set", "algo.prompts_per_step=2", "--set", "algo.group_size=2", "--set", "optim.minibatch_size=2",
        "--set", "sft.batch_size=2", "--set", "sft.steps=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A valid 6-record demo split (records, SFT, pairs, constitutions) and its image folder."""
    directory = tmp_path_factory.mktemp("data")
    paths = write_split(make_split(6, 0, "train"), directory, "train")
    return directory, paths


def rows(paths, key="records"):
    return [json.loads(line) for line in paths[key].read_text().splitlines()]


def write_rows(path, items):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in items))
    return path


def truncated_png(directory, name="broken.png"):
    """A PNG whose header reads but whose pixels do not decode."""
    source = next((directory / "images").glob("train-*.png")).read_bytes()
    path = directory / "images" / name
    path.write_bytes(source[: len(source) // 2])
    return f"images/{name}"


def caspo(capsys, *argv):
    """(exit status, stdout, stderr lines) of `caspo ARGV...` run in-process; the lines of a
    progress bar the run had drawn before the error (closed, so the error has its own line)
    are left out."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, [ln for ln in captured.err.strip().splitlines() if "%|" not in ln]


def assert_one_error_line(err_lines, *needles):
    """stderr holds exactly one line, `caspo: ...`, containing every needle."""
    assert len(err_lines) == 1, err_lines
    line = err_lines[0]
    assert line.startswith("caspo: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    assert "Traceback" not in line
    return line


def train(capsys, data_dir, jsonl, tmp_path, *extra):
    return caspo(capsys, "train", *TINY, "--set", f"data.train={jsonl}",
                 "--set", f"data.constitutions={data_dir / 'constitutions.yaml'}", "--out", tmp_path / "run", *extra)


# -- data errors at `caspo train` -------------------------------------------------------------

def test_malformed_jsonl_line(data, tmp_path, capsys):
    directory, paths = data
    lines = paths["records"].read_text().splitlines()
    bad = write_rows(directory / "malformed.jsonl", lines[:3] + ['{"id": "x", "query": "unterminated'] + lines[3:])
    code, _, err = train(capsys, directory, bad, tmp_path)
    assert code == 2
    line = assert_one_error_line(err, f"{bad}:4: not valid JSON", "at column", "--set data.max_bad_fraction=0.15")
    assert "at at" not in line
    # the knob the message names exists: with it the bad line is skipped and the run gets past loading
    # (the saved config records the directory the run used, not the default runs/caspo)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert f"out_dir: {tmp_path / 'run'}" in saved and "max_bad_fraction: 0.0" in saved


def test_missing_image(data, tmp_path, capsys):
    directory, paths = data
    records = rows(paths)
    records[1]["images"] = ["images/not-there.png"]
    bad = write_rows(directory / "missing.jsonl", records)
    code, _, err = train(capsys, directory, bad, tmp_path)
    assert code == 2
    assert_one_error_line(err, f"{bad}:2: field 'images'", "not-there.png not found", "fix the path")


def test_image_path_escaping_the_root(data, tmp_path, capsys):
    directory, paths = data
    records = rows(paths)
    records[0]["images"] = ["../../../etc/passwd"]
    bad = write_rows(directory / "escape.jsonl", records)
    code, _, err = train(capsys, directory, bad, tmp_path)
    assert code == 2
    assert_one_error_line(err, f"{bad}:1: field 'images'", "outside the root", "keep images under the root")


def test_unknown_category(data, tmp_path, capsys):
    directory, paths = data
    records = rows(paths)
    records[2]["category"] = "weapons"
    bad = write_rows(directory / "category.jsonl", records)
    code, _, err = train(capsys, directory, bad, tmp_path)
    assert code == 2
    assert_one_error_line(err, f"{bad}:3: field 'category' is 'weapons'", "use one of violent")


def test_empty_file(data, tmp_path, capsys):
    directory, _ = data
    empty = directory / "empty.jsonl"
    empty.write_text("")
    code, _, err = train(capsys, directory, empty, tmp_path)
    assert code == 2
    assert_one_error_line(err, f"{empty}: no records", "one JSON object per line")


def test_truncated_png_stops_with_one_line_naming_image_and_record(data, tmp_path, capsys):
    """Only decoding finds a truncated PNG, inside the data iterator; how many records are
    decoded by then depends on grain's prefetch, so the knob (offered only while some record
    is still good) is not asserted here (tests/data/test_data_records.py checks it)."""
    directory, paths = data
    records = rows(paths)[:2]
    for record in records:
        record["images"] = [truncated_png(directory)]
    bad = write_rows(directory / "truncated.jsonl", records)
    code, _, err = train(capsys, directory, bad, tmp_path)
    assert code == 2
    line = assert_one_error_line(err, str(bad), "records have bad images", "broken.png: cannot decode image",
                                 "; fix")
    assert "skipping" not in line


def test_every_prompt_too_long_names_data_max_prompt_len(data, tmp_path, capsys):
    directory, paths = data
    code, _, err = train(capsys, directory, paths["records"], tmp_path, "--set", "data.max_prompt_len=20")
    assert code == 2
    assert_one_error_line(err, str(paths["records"]), "longer than max_prompt_len=20",
                          "--set data.max_prompt_len=")


# -- data errors at `caspo sft` ---------------------------------------------------------------

def sft(capsys, data_dir, jsonl, tmp_path, *extra):
    return caspo(capsys, "sft", *TINY, "--set", f"data.sft={jsonl}",
                 "--set", f"data.constitutions={data_dir / 'constitutions.yaml'}", "--out", tmp_path / "sft", *extra)


def test_sft_malformed_line_and_unreadable_image(data, tmp_path, capsys):
    directory, paths = data
    lines = paths["sft"].read_text().splitlines()
    bad = write_rows(directory / "sft_bad.jsonl", lines[:1] + ["not json"] + lines[1:])
    code, _, err = sft(capsys, directory, bad, tmp_path)
    assert code == 2
    assert_one_error_line(err, f"{bad}:2: not valid JSON", "data.max_bad_fraction")

    examples = rows(paths, "sft")
    examples[0]["images"] = [truncated_png(directory)]
    bad = write_rows(directory / "sft_truncated.jsonl", examples)
    code, _, err = sft(capsys, directory, bad, tmp_path / "again")
    assert code == 2
    assert_one_error_line(err, str(bad), f"example {examples[0]['id']!r}", "cannot decode image",
                          "--set data.max_bad_fraction=")


def test_sft_every_prompt_too_long_names_data_max_prompt_len(data, tmp_path, capsys):
    directory, paths = data
    code, _, err = sft(capsys, directory, paths["sft"], tmp_path, "--set", "data.max_prompt_len=20")
    assert code == 2
    assert_one_error_line(err, str(paths["sft"]), "longer than data.max_prompt_len=20", "--set data.max_prompt_len=")


# -- config errors and the echoed config ------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "sft", "dpo", "demo", "dryrun"])
def test_config_errors_go_to_stderr_as_one_line(command, capsys):
    code, out, err = caspo(capsys, command, "--set", "algo.group_size=1")
    assert code == 2 and out == ""
    assert_one_error_line(err, "config error", "group_size=1")


def test_max_bad_fraction_is_a_config_knob(capsys):
    code, out, _ = caspo(capsys, "train", "--set", "data.max_bad_fraction=0.1", "--print-config")
    assert code == 0 and "max_bad_fraction: 0.1" in out
    code, out, err = caspo(capsys, "train", "--set", "data.max_bad_fraction=1.5")
    assert code == 2 and out == ""
    assert_one_error_line(err, "data.max_bad_fraction", "[0, 1)")


def test_echoed_config_shows_the_run_directory(tmp_path, capsys):
    code, out, _ = caspo(capsys, "sft", "--out", tmp_path / "mine", "--print-config")
    assert code == 0 and f"out_dir: {tmp_path / 'mine'}" in out
    code, out, _ = caspo(capsys, "sft", "--print-config")
    assert code == 0 and "out_dir: runs/sft" in out  # the command's own default, not runs/caspo
    code, out, _ = caspo(capsys, "train", "--set", f"run.out_dir={tmp_path / 'cfg'}", "--print-config")
    assert code == 0 and f"out_dir: {tmp_path / 'cfg'}" in out


def test_bad_topology_goes_to_stderr(capsys):
    code, out, err = caspo(capsys, "dryrun", "--topology", "7x80", "--mesh", "2,2,2")
    assert code == 2 and out == ""
    assert_one_error_line(err, "--topology/--mesh")


def test_a_halted_run_exits_3_with_one_line(capsys):
    def halt():
        raise RunHalted("runs/x: every reward failed for 3 steps; saved step 7, fix the judge and --resume")

    assert run_stage(halt) == 3
    assert capsys.readouterr().err == "caspo: runs/x: every reward failed for 3 steps; saved step 7, fix the judge " \
                                      "and --resume\n"


# -- untrusted checkpoints --------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL HF directory (config.json, safetensors, tokenizer, processor)."""
    directory = tmp_path_factory.mktemp("hf")
    tokenizer = build_tiny_tokenizer()
    model = Qwen2_5_VL(Qwen2_5_VLConfig.from_dict(tiny_hf_config("test", tokenizer_info(tokenizer))))
    save_pretrained(model, model.init(jax.random.PRNGKey(0), jnp.float32), directory)
    save_tiny_processor(build_tiny_processor(tokenizer), directory)
    return directory


def copy_checkpoint(hf_dir, target, edit_file=None, **keys):
    shutil.copytree(hf_dir, target)
    if edit_file:
        config = json.loads((target / edit_file).read_text())
        (target / edit_file).write_text(json.dumps({**config, **keys}))
    return target


@pytest.mark.parametrize("edit_file, keys", [
    ("config.json", {"auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilModel"}}),
    ("tokenizer_config.json", {"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}),
    ("config.json", {"trust_remote_code": True}),
])
def test_checkpoint_asking_for_its_own_code_is_refused(data, hf_dir, tmp_path, capsys, edit_file, keys):
    directory, paths = data
    untrusted = copy_checkpoint(hf_dir, tmp_path / "untrusted", edit_file, **keys)
    (untrusted / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    code, _, err = train(capsys, directory, paths["records"], tmp_path, "--set", f"model.path={untrusted}")
    assert code == 2
    assert_one_error_line(err, str(untrusted), f"{edit_file}: {next(iter(keys))}", "modeling_evil.py",
                          "--ignore-custom-code", "never run")


def test_pickle_only_checkpoint_exits_2(data, hf_dir, tmp_path, capsys):
    directory, paths = data
    pickled = copy_checkpoint(hf_dir, tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    code, _, err = train(capsys, directory, paths["records"], tmp_path, "--set", f"model.path={pickled}")
    assert code == 2
    assert_one_error_line(err, str(pickled), "pytorch_model.bin", "pickle checkpoints are never loaded",
                          "safe_serialization=True")


@pytest.mark.parametrize("command", ["train", "sft", "dpo", "demo", "sweep"])
def test_ignore_custom_code_flag_becomes_the_model_override(command):
    """--ignore-custom-code is the explicit opt-in the refusal names; it travels in the run config."""
    from caspo_jax.launch.cli import build_parser
    from caspo_jax.launch.run_args import cli_overrides

    argv = [command, "--set", "algo.lam=0.6"]
    assert cli_overrides(build_parser(argv).parse_args(argv)) == ["algo.lam=0.6"]
    argv = [command, "--set", "algo.lam=0.6", "--ignore-custom-code"]
    assert cli_overrides(build_parser(argv).parse_args(argv)) == ["algo.lam=0.6", "model.ignore_custom_code=true"]


def test_ignore_custom_code_loads_the_weights_and_never_runs_the_code(hf_dir, tmp_path):
    """With model.ignore_custom_code the policy and the OMC teacher load as plain Qwen-VL
    weights; without it both are refused; the declared module is never imported."""
    from caspo_jax.models.common.checkpoint import UntrustedCheckpointError
    from caspo_jax.loop.config import DataConfig, ModelConfig
    from caspo_jax.loop.setup import build_policy, load_teacher_params

    untrusted = copy_checkpoint(hf_dir, tmp_path / "untrusted", "config.json",
                                auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (untrusted / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    refused = ModelConfig(path=str(untrusted), teacher_path=str(untrusted))
    with pytest.raises(UntrustedCheckpointError):
        build_policy(refused, DataConfig())
    allowed = ModelConfig(path=str(untrusted), teacher_path=str(untrusted), ignore_custom_code=True)
    policy = build_policy(allowed, DataConfig())
    teacher = load_teacher_params(allowed, policy.model)
    plain = build_policy(ModelConfig(path=str(hf_dir)), DataConfig())
    for got, want in ((policy.params, plain.params), (teacher, plain.params)):
        jax.tree.map(np.testing.assert_array_equal, got, want)
    with pytest.raises(UntrustedCheckpointError):
        load_teacher_params(refused, policy.model)


def test_fresh_run_into_a_directory_with_checkpoints_exits_2(data, tmp_path, capsys):
    from caspo_jax.loop.checkpoint import RunCheckpointer

    directory, paths = data
    old = RunCheckpointer(tmp_path / "sft" / "checkpoints")
    old.save(5, {"w": jnp.zeros(2)}, {"step": 5})
    old.close()
    code, _, err = sft(capsys, directory, paths["sft"], tmp_path)
    assert code == 2
    assert_one_error_line(err, str(tmp_path / "sft" / "checkpoints"), "already holds checkpoints [5]", "--resume",
                          "new --out")


@pytest.mark.parametrize("command, field", [("sft", "data.sft"), ("dpo", "data.pairs")])
def test_exchange_stage_without_its_data_file_names_the_field(data, hf_dir, tmp_path, capsys, command, field):
    """Prompts given but not the stage's own file: exit 2 naming the field and its --set."""
    _, paths = data
    code = main([command, "--out", str(tmp_path / command), "--set", f"model.path={hf_dir}",
                 "--set", f"data.train={paths['records']}"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert_one_error_line(err, field, f"--set {field}=PATH")
