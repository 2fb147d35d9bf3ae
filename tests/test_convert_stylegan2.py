"""Safe conversion of NVIDIA StyleGAN2 pickles and state dicts (+ the tool)."""

import json
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

# pylint: disable=g-import-not-at-top,wrong-import-position
from synthdistill_jax import convert
from synthdistill_jax import safe_pickle
from synthdistill_jax.convert import stylegan2 as convert_sg2
from synthdistill_jax.models import stylegan2
from tests import golden
from tests import nvidia_pickles

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "convert_stylegan2.py"
CASES = ("stylegan2_sg3_small", "stylegan2_ada_small")


def _golden_variables(case):
  kwargs = convert_sg2._normalise_config(  # pylint: disable=protected-access
      golden.load_manifest(case)["config"]["G_init_kwargs"]
  )
  module = stylegan2.create("stylegan2", **kwargs)
  return module, convert_sg2.state_dict_to_variables(
      golden.state_dict(case), module
  )


def _assert_same_tree(a, b):
  flat_a = dict(_flatten(a))
  flat_b = dict(_flatten(b))
  assert flat_a.keys() == flat_b.keys()
  for key, value in flat_a.items():
    np.testing.assert_array_equal(value, flat_b[key], err_msg=key)


def _flatten(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, f"{prefix}{key}/")
    else:
      yield prefix + key, np.asarray(value)


@pytest.mark.parametrize("case", CASES)
def test_official_format_pickle_converts(case, tmp_path):
  marker = tmp_path / "MARKER"
  path = tmp_path / "network-snapshot.pkl"
  # The embedded module source would create the marker if it were run.
  src = f"import os\nos.system('touch {marker}')\n"
  nvidia_pickles.write_official_pickle(path, case, module_src=src)
  assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules
  module, variables = convert.load_stylegan2(path)
  assert not marker.exists()
  assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules
  ref_module, ref_variables = _golden_variables(case)
  # w_avg_beta is only recorded in the state (0.998 stylegan3, 0.995 ada).
  assert module.w_avg_beta == (0.998 if "sg3" in case else 0.995)
  assert module.clone(w_avg_beta=ref_module.w_avg_beta) == ref_module
  _assert_same_tree(variables, ref_variables)
  arrays = golden.load_arrays(case)
  ws = module.apply(variables, arrays["z"], arrays.get("c"), method="mapping")
  assert np.abs(np.asarray(ws) - arrays["ws_psi1"]).max() <= 1e-5
  _, _, metadata = convert_sg2.read_checkpoint(path)
  writer = "stylegan3" if "sg3" in case else "stylegan2-ada"
  assert metadata["writer"].startswith(f"NVlabs/{writer}")


@pytest.mark.parametrize(
    "case,expected", [(CASES[0], (4, 256)), (CASES[1], (0, None))]
)
def test_missing_kwargs_use_the_writers_defaults(case, expected, tmp_path):
  path = tmp_path / "g.pkl"
  nvidia_pickles.write_official_pickle(
      path, case, state_attrs=False, drop_kwargs=("num_fp16_res", "conv_clamp")
  )
  kwargs, _, metadata = convert_sg2.read_checkpoint(path)
  assert (kwargs["num_fp16_res"], kwargs["conv_clamp"]) == expected
  assert metadata["defaults_used"]["num_fp16_res"] == expected[0]
  assert metadata["defaults_used"]["conv_clamp"] == expected[1]
  assert kwargs["channel_base"] == 4096  # still read from the file


class _Payload:
  """Pickles as a call that would create `marker`."""

  def __init__(self, marker, via):
    self.marker, self.via = marker, via

  def __reduce__(self):
    if self.via == "exec":
      import builtins  # pylint: disable=g-import-not-at-top

      return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("via", ["system", "exec"])
def test_pickle_with_a_payload_is_refused(via, tmp_path):
  marker = tmp_path / "PWNED"
  path = tmp_path / "evil.pkl"
  data = {"G_ema": _Payload(marker, via), "D": None}
  path.write_bytes(pickle.dumps(data, protocol=4))
  with pytest.raises(
      safe_pickle.UnsafePickleError, match="refused global"
  ) as e:
    convert.load_stylegan2(path)
  assert str(path) in str(e.value) and "\n" not in str(e.value)
  assert ("exec" in str(e.value)) == (via == "exec")
  assert not marker.exists()
  if via == "exec":
    return  # The tool handles every refusal the same way; run it once.
  result = subprocess.run(
      [
          sys.executable,
          str(TOOL),
          "--input",
          str(path),
          "--output",
          str(tmp_path / "out"),
      ],
      capture_output=True,
      text=True,
      check=False,
  )
  assert result.returncode != 0 and not marker.exists()
  assert result.stderr.count("\n") == 1 and "refused global" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "out").exists()


def test_stylegan3_alias_free_generator_is_refused(tmp_path):
  path = tmp_path / "sg3.pkl"
  layers = {
      "synthesis.input.weight": torch.zeros(4, 2),
      "synthesis.L0_36_512.weight": torch.zeros(4, 4, 3, 3),
  }
  nvidia_pickles.write_official_pickle(
      path, CASES[0], synthesis_children=layers
  )
  with pytest.raises(
      convert_sg2.ConversionError, match="unsupported architecture"
  ):
    convert.load_stylegan2(path)


def test_truncated_pickle_is_refused(tmp_path):
  path = tmp_path / "g.pkl"
  nvidia_pickles.write_official_pickle(path, CASES[0])
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(safe_pickle.UnsafePickleError, match="not a readable"):
    convert.load_stylegan2(path)


def _save_state_dict(path, sd):
  torch.save(sd, path)
  return path


@pytest.mark.parametrize("nested", [False, True])
def test_state_dict_with_config(nested, tmp_path):
  case = CASES[1]
  g_kwargs = golden.load_manifest(case)["config"]["G_init_kwargs"]
  config = g_kwargs if nested else convert_sg2._normalise_config(g_kwargs)  # pylint: disable=protected-access
  path = _save_state_dict(tmp_path / "g.pt", golden.torch_state_dict(case))
  module, variables = convert.load_stylegan2(path, config=config)
  ref_module, ref_variables = _golden_variables(case)
  assert module == ref_module
  _assert_same_tree(variables, ref_variables)


@pytest.mark.parametrize(
    "edit,message",
    [
        ("missing", "missing key synthesis.b16.conv0.weight"),
        ("misshapen", "synthesis.b16.conv0.weight has shape [128, 128, 3, 1]"),
        ("unexpected", "unexpected key synthesis.b16.extra"),
        ("truncated", "not a readable PyTorch checkpoint"),
        ("nan", "tensor synthesis.b16.conv0.weight has 1 non-finite value"),
        ("int64", "tensor mapping.w_avg has dtype int64, expected a float"),
    ],
)
def test_bad_state_dicts_give_one_line(edit, message, tmp_path):
  case = CASES[0]
  sd = golden.torch_state_dict(case)
  key = "synthesis.b16.conv0.weight"
  if edit == "missing":
    del sd[key]
  elif edit == "misshapen":
    sd[key] = sd[key][..., :1]
  elif edit == "unexpected":
    sd["synthesis.b16.extra"] = torch.zeros(2)
  elif edit == "nan":
    sd[key][0, 0, 0, 0] = float("nan")
  elif edit == "int64":
    sd["mapping.w_avg"] = sd["mapping.w_avg"].round().long()
  path = _save_state_dict(tmp_path / "g.pt", sd)
  if edit == "truncated":
    path.write_bytes(path.read_bytes()[:5000])
  config = golden.load_manifest(case)["config"]["G_init_kwargs"]
  with pytest.raises(convert_sg2.ConversionError) as e:
    convert.load_stylegan2(path, config=config)
  assert message in str(e.value) and str(path) in str(e.value)
  assert "\n" not in str(e.value)


def _run_tool(*args):
  return subprocess.run(
      [sys.executable, str(TOOL), *map(str, args)],
      capture_output=True,
      text=True,
      check=False,
      env=dict(os.environ, PYTHONPATH=str(ROOT)),
  )


def test_tool_state_dict_errors_are_one_line_without_unsafe_advice(tmp_path):
  case = CASES[0]
  config = tmp_path / "g.json"
  config.write_text(
      json.dumps(golden.load_manifest(case)["config"]["G_init_kwargs"])
  )
  marker = tmp_path / "PWNED"
  evil = tmp_path / "evil.pt"
  torch.save({"mapping.w_avg": _Payload(marker, "exec")}, evil)
  result = _run_tool(
      "--input", evil, "--output", tmp_path / "o", "--config", config
  )
  assert result.returncode == 1 and not marker.exists()
  assert result.stderr.count("\n") == 1, result.stderr
  assert "refused global" in result.stderr and "exec" in result.stderr
  # torch's message advises `weights_only=False`; it must never reach users.
  assert "weights_only" not in result.stderr
  assert "safe_globals" not in result.stderr
  assert not (tmp_path / "o").exists()
  # A non-finite tensor: one line naming it; --allow_nonfinite converts.
  sd = golden.torch_state_dict(case)
  sd["mapping.fc0.bias"][1] = float("inf")
  good = _save_state_dict(tmp_path / "inf.pt", sd)
  result = _run_tool(
      "--input", good, "--output", tmp_path / "o", "--config", config
  )
  assert result.returncode == 1 and result.stderr.count("\n") == 1
  assert "tensor mapping.fc0.bias has 1 non-finite" in result.stderr
  assert "--allow_nonfinite" in result.stderr
  result = _run_tool(
      "--input",
      good,
      "--output",
      tmp_path / "o",
      "--config",
      config,
      "--allow_nonfinite",
  )
  assert result.returncode == 0, result.stderr
  model = json.loads((tmp_path / "o" / "model.json").read_text())
  assert model["metadata"]["allow_nonfinite"] is True
  # A config file that is not JSON: one line, no traceback.
  config.write_text("{not json")
  result = _run_tool(
      "--input", good, "--output", tmp_path / "p", "--config", config
  )
  assert result.returncode == 1 and result.stderr.count("\n") == 1
  assert "not a readable JSON file" in result.stderr


_READ_BACK = """
import sys
sys.modules['torch'] = None  # reading a converted model must not need torch
import jax, numpy as np
jax.config.update('jax_default_matmul_precision', 'highest')
from synthdistill_jax.models import stylegan2
module, v = stylegan2.load(sys.argv[1])
a = np.load(sys.argv[2])
ws = module.apply(v, a['z'], None, method='mapping')
flat = {'/'.join(k.key for k in p): np.asarray(x)
        for p, x in jax.tree_util.tree_flatten_with_path(v)[0]}
np.savez(sys.argv[3], ws=np.asarray(ws), num_ws=module.num_ws, **flat)
"""


def test_tool_round_trip(tmp_path):
  case = CASES[0]
  pkl, out = tmp_path / "g.pkl", tmp_path / "model"
  nvidia_pickles.write_official_pickle(pkl, case)
  result = subprocess.run(
      [sys.executable, str(TOOL), "--input", str(pkl), "--output", str(out)],
      capture_output=True,
      text=True,
      check=False,
      # A log line for every phase, however quick (not a terminal).
      env=dict(os.environ, SYNTHDISTILL_PROGRESS_EVERY_S="0"),
  )
  assert result.returncode == 0, result.stderr
  assert "num_ws 10" in result.stdout
  for phase in ("reading", "converting", "saving"):
    assert f"convert g.pkl: {phase} done in" in result.stderr
  arrays = golden.load_arrays(case)
  np.savez(tmp_path / "in.npz", z=arrays["z"])
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  read = subprocess.run(
      [
          sys.executable,
          "-c",
          _READ_BACK,
          str(out),
          str(tmp_path / "in.npz"),
          str(tmp_path / "out.npz"),
      ],
      capture_output=True,
      text=True,
      check=False,
      env=env,
  )
  assert read.returncode == 0, read.stderr
  got = dict(np.load(tmp_path / "out.npz"))
  assert np.abs(got.pop("ws") - arrays["ws_psi1"]).max() <= 1e-5
  assert int(got.pop("num_ws")) == 10
  # The variables are bit-identical to the golden ones, whose images match
  # the official outputs (tests/test_stylegan2.py).
  _, ref_variables = _golden_variables(case)
  assert got.keys() == dict(_flatten(ref_variables)).keys()
  for key, value in _flatten(ref_variables):
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  again = subprocess.run(
      [sys.executable, str(TOOL), "--input", str(pkl), "--output", str(out)],
      capture_output=True,
      text=True,
      check=False,
  )
  assert again.returncode == 1 and "already holds a model" in again.stderr


_UPSTREAM_SNAPSHOT = """
import copy, pickle, sys
import numpy as np, torch
import dnnlib
res, out = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
try:
  from training import networks_stylegan2 as net  # NVlabs/stylegan3
  kw = dict(channel_base=16384 if res == 256 else 32768, channel_max=512,
            num_fp16_res=4, conv_clamp=256)
  make = lambda: net.Generator(z_dim=512, c_dim=0, w_dim=512,
      img_resolution=res, img_channels=3,
      mapping_kwargs=dnnlib.EasyDict(num_layers=8), **kw)
except ImportError:
  from training import networks as net  # NVlabs/stylegan2-ada-pytorch
  kw = dict(channel_base=32768, channel_max=512, num_fp16_res=4,
            conv_clamp=256)
  make = lambda: net.Generator(z_dim=512, c_dim=0, w_dim=512,
      img_resolution=res, img_channels=3,
      mapping_kwargs=dnnlib.EasyDict(num_layers=8),
      synthesis_kwargs=dnnlib.EasyDict(kw))
G = make()
with torch.no_grad():  # make biases, noise strengths and w_avg count
  for name, p in list(G.named_parameters()) + list(G.named_buffers()):
    if name.endswith('noise_strength') or name == 'mapping.w_avg':
      p.copy_(0.3 * torch.randn(p.shape))
    elif name.endswith('bias'):
      p.add_(0.1 * torch.randn(p.shape))
D = net.Discriminator(c_dim=0, img_resolution=res, img_channels=3, **kw)
snap = dict(training_set_kwargs=dict(dnnlib.EasyDict(resolution=res)))
for name, module in [('G', G), ('D', D), ('G_ema', G)]:
  snap[name] = copy.deepcopy(module).eval().requires_grad_(False).cpu()
pickle.dump(snap, open(out + '.pkl', 'wb'))
z = torch.randn(1, 512)
with torch.no_grad():
  ws = snap['G_ema'].mapping(z, None, truncation_psi=0.7, truncation_cutoff=8)
  img = snap['G_ema'].synthesis(ws, noise_mode='const', force_fp32=True)
np.savez(out + '.npz', z=z.numpy(), ws=ws.numpy(), img=img.numpy())
"""


@pytest.mark.skipif(
    "STYLEGAN2_UPSTREAM" not in os.environ,
    reason="set STYLEGAN2_UPSTREAM to an NVlabs/stylegan3 or"
    " stylegan2-ada-pytorch checkout to compare full-size pickles",
)
def test_full_size_upstream_pickle(tmp_path):
  """Official code pickles a full-size generator; convert and compare."""
  upstream = os.environ["STYLEGAN2_UPSTREAM"]
  res = int(os.environ.get("STYLEGAN2_UPSTREAM_RES", "256"))
  base = str(tmp_path / "g")
  path = [upstream, os.environ.get("PYTHONPATH", "")]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
  subprocess.run(
      [sys.executable, "-c", _UPSTREAM_SNAPSHOT, str(res), base],
      cwd=upstream,
      env=env,
      check=True,
  )
  assert "torch_utils" not in sys.modules
  module, variables = convert.load_stylegan2(base + ".pkl")
  ref = np.load(base + ".npz")
  ws = module.apply(
      variables,
      ref["z"],
      truncation_psi=0.7,
      truncation_cutoff=8,
      method="mapping",
  )
  img = jax.jit(
      lambda v, ws: module.apply(v, ws, noise_mode="const", method="synthesis")
  )(variables, ws)
  ws_diff = np.abs(np.asarray(ws) - ref["ws"]).max()
  img_diff = np.abs(np.asarray(img) - ref["img"].transpose(0, 2, 3, 1)).max()
  print(
      f"\n{res}px num_ws {module.num_ws}: ws max|diff| {ws_diff:.2e},"
      f" img max|diff| {img_diff:.2e}"
  )
  assert ws_diff <= 1e-5 and img_diff <= 1e-3
