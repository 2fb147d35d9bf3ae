"""Test helper: writes pickles in the exact format of NVIDIA's network files.

Official StyleGAN `.pkl` files pickle every network through
`torch_utils.persistence`: a module becomes
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with
`meta = {type: 'class', version: 6, module_src, class_name, state}` and
`state` the module's `__dict__`. Kwargs are `dnnlib.util.EasyDict`s, tensors
are pickled by PyTorch itself (`torch._utils._rebuild_tensor_v2`,
`torch.storage._load_from_bytes`), gains are numpy scalars.

`fake_nvidia_modules()` registers stand-in `torch_utils.persistence` and
`dnnlib.util` modules in `sys.modules` only while a pickle is written, so that
`pickle.dump` emits exactly those globals; the stand-ins are removed again,
so nothing of them exists when the converter reads the file.
"""

import collections
import contextlib
import pickle
import sys
import types

import numpy as np

PERSISTENCE_VERSION = 6

# Class names per node of the generator tree, by the node's last key part.
_CLASS_NAMES = {
    "": "Generator",
    "mapping": "MappingNetwork",
    "synthesis": "SynthesisNetwork",
    "affine": "FullyConnectedLayer",
    "embed": "FullyConnectedLayer",
    "conv0": "SynthesisLayer",
    "conv1": "SynthesisLayer",
    "torgb": "ToRGBLayer",
    "skip": "Conv2dLayer",
}


def _reconstruct_placeholder(meta):
  raise AssertionError("the test stand-in reconstructor must never be called")


@contextlib.contextmanager
def fake_nvidia_modules():
  """Registers stand-in `torch_utils.persistence` and `dnnlib.util` modules."""
  names = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")
  saved = {n: sys.modules.get(n) for n in names}
  persistence = types.ModuleType("torch_utils.persistence")
  _reconstruct_placeholder.__module__ = "torch_utils.persistence"
  _reconstruct_placeholder.__qualname__ = "_reconstruct_persistent_obj"
  persistence._reconstruct_persistent_obj = _reconstruct_placeholder
  util = types.ModuleType("dnnlib.util")

  class EasyDict(dict):  # pylint: disable=missing-class-docstring
    pass

  EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
  util.EasyDict = EasyDict
  sys.modules["torch_utils"] = types.ModuleType("torch_utils")
  sys.modules["torch_utils.persistence"] = persistence
  sys.modules["dnnlib"] = types.ModuleType("dnnlib")
  sys.modules["dnnlib.util"] = util
  try:
    yield types.SimpleNamespace(EasyDict=EasyDict, persistence=persistence)
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module


class Persistent:
  """Pickles like an NVIDIA persistent module instance."""

  def __init__(self, class_name, state, module_src):
    self.class_name, self.state, self.module_src = class_name, state, module_src

  def __reduce__(self):
    meta = dict(
        type="class",
        version=PERSISTENCE_VERSION,
        module_src=self.module_src,
        class_name=self.class_name,
        state=self.state,
    )
    reconstruct = sys.modules["torch_utils.persistence"]
    return (reconstruct._reconstruct_persistent_obj, (meta,))


def build_tree(state_dict, class_names, attributes, module_src):
  """A `Persistent` tree whose states are real `torch.nn.Module.__dict__`s.

  Args:
    state_dict: flat `{key: torch.Tensor}`.
    class_names: `{node prefix: class name}`; defaults from the key names.
    attributes: `{node prefix: {attr: value}}` extra state entries.
    module_src: the source string stored in every record.

  Returns:
    The root `Persistent`.
  """
  import torch  # pylint: disable=g-import-not-at-top

  nodes = {"": {}}
  for key in state_dict:
    parts = key.split(".")
    for i in range(1, len(parts)):
      nodes.setdefault(".".join(parts[:i]), {})

  def build(prefix):
    module = torch.nn.Module()
    children = collections.OrderedDict()
    depth = prefix.count(".") + 1 if prefix else 0
    for node in sorted(nodes, key=lambda n: (n.count("."), n)):
      if (
          node
          and node.count(".") + 1 == depth + 1
          and node.startswith(prefix + "." if prefix else "")
      ):
        children[node.rsplit(".", 1)[-1]] = build(node)
    for key, value in state_dict.items():
      head, _, leaf = key.rpartition(".")
      if head != prefix:
        continue
      if leaf in ("weight", "bias", "const", "noise_strength"):
        module.register_parameter(
            leaf, torch.nn.Parameter(value.clone(), requires_grad=False)
        )
      else:
        module.register_buffer(leaf, value.clone())
    state = dict(module.__dict__)
    state["_modules"] = children
    state.setdefault("_init_args", ())
    state.setdefault("_init_kwargs", {})
    state.update(attributes.get(prefix, {}))
    last = prefix.rsplit(".", 1)[-1]
    name = class_names.get(prefix) or _CLASS_NAMES.get(last)
    if name is None:
      name = "SynthesisBlock" if last.startswith("b") else "FullyConnectedLayer"
    return Persistent(name, state, module_src)

  return build("")


def write_pickle(path, data):
  """`pickle.dump(data)` at protocol 4 (inside `fake_nvidia_modules()`)."""
  with open(path, "wb") as f:
    pickle.dump(data, f, protocol=4)


def generator_attributes(g_kwargs, flavour, resolutions, state_attrs=True):
  """Per-node state entries the official modules store.

  Args:
    g_kwargs: the Generator's init kwargs (as pickled).
    flavour: 'stylegan3' or 'stylegan2-ada'.
    resolutions: block resolutions, 4 first.
    state_attrs: also store the plain attributes (num_layers, conv_clamp,
      architecture, ...) that the official modules set in `__init__`.

  Returns:
    `{node prefix: {name: value}}`.
  """
  attrs = {"": dict(_init_kwargs=g_kwargs)}
  if not state_attrs:
    return attrs
  synthesis_kw = g_kwargs.get("synthesis_kwargs", g_kwargs)
  conv_clamp = synthesis_kw.get("conv_clamp")
  attrs[""].update(
      {k: g_kwargs[k] for k in ("z_dim", "c_dim", "w_dim") if k in g_kwargs}
  )
  attrs["mapping"] = dict(
      num_layers=8, w_avg_beta=0.998 if flavour == "stylegan3" else 0.995
  )
  for i in range(8):
    # Gains are numpy float64 scalars in the official modules.
    attrs[f"mapping.fc{i}"] = dict(
        activation="lrelu",
        bias_gain=0.01,
        weight_gain=np.float64(0.01 / np.sqrt(128)),
    )
  if flavour == "stylegan3":
    attrs["synthesis"] = dict(num_fp16_res=synthesis_kw.get("num_fp16_res"))
  for res in resolutions:
    block = dict(architecture="skip", use_fp16=False)
    if flavour == "stylegan3":
      block["fused_modconv_default"] = True
    attrs[f"synthesis.b{res}"] = block
    for layer in ("conv0", "conv1", "torgb"):
      attrs[f"synthesis.b{res}.{layer}"] = dict(
          conv_clamp=conv_clamp, act_gain=np.float64(np.sqrt(2))
      )
  return attrs


def write_official_pickle(
    path,
    case,
    *,
    module_src="",
    state_attrs=True,
    drop_kwargs=(),
    synthesis_children=None,
    init_kwargs=None,
):
  """Writes a golden case as a complete official training snapshot pickle.

  Args:
    path: output file.
    case: 'stylegan2_sg3_small' (stylegan3 flavour, flat synthesis kwargs)
      or 'stylegan2_ada_small' (ada flavour, `synthesis_kwargs`).
    module_src: source text stored in every record (never to be run).
    state_attrs: store the modules' plain attributes too.
    drop_kwargs: synthesis/mapping kwargs to leave out of the init kwargs.
    synthesis_children: replace the synthesis network's state dict keys
      (e.g. a StyleGAN3 alias-free layout).
    init_kwargs: Generator init kwargs to change (e.g. `num_fp16_res`,
      which changes no stored tensor).

  Returns:
    The Generator kwargs written to the file.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from tests import golden  # pylint: disable=g-import-not-at-top

  manifest = golden.load_manifest(case)
  flavour = "stylegan3" if "sg3" in case else "stylegan2-ada"
  sd = golden.torch_state_dict(case)
  if synthesis_children is not None:
    sd = {k: v for k, v in sd.items() if not k.startswith("synthesis.")}
    sd.update(synthesis_children)
  resolutions = manifest["config"]["block_resolutions"]
  with fake_nvidia_modules() as fake:
    easy = fake.EasyDict
    g_kwargs = dict(manifest["config"]["G_init_kwargs"], **(init_kwargs or {}))
    g_kwargs["mapping_kwargs"] = easy(g_kwargs["mapping_kwargs"])
    if "synthesis_kwargs" in g_kwargs:
      g_kwargs["synthesis_kwargs"] = easy(g_kwargs["synthesis_kwargs"])
    for key in drop_kwargs:
      g_kwargs.get("synthesis_kwargs", g_kwargs).pop(key, None)
      g_kwargs["mapping_kwargs"].pop(key, None)
    attrs = generator_attributes(g_kwargs, flavour, resolutions, state_attrs)
    g_ema = build_tree(sd, {}, attrs, module_src)
    g = build_tree(sd, {}, attrs, module_src)
    d = build_tree(
        {"b64.fromrgb.weight": torch.ones(4, 3, 1, 1)},
        {"": "Discriminator", "b64": "DiscriminatorBlock"},
        {"": dict(_init_kwargs=easy(c_dim=0, img_resolution=64))},
        module_src,
    )
    augment_pipe = build_tree(
        {"p": torch.zeros([])}, {"": "AugmentPipe"}, {}, module_src
    )
    data = dict(
        training_set_kwargs=dict(
            easy(class_name="training.dataset.ImageFolderDataset", path="x")
        ),
        G=g,
        D=d,
        G_ema=g_ema,
        augment_pipe=augment_pipe,
    )
    write_pickle(path, data)
  return g_kwargs


# NVIDIA's FFHQ 256x256 StyleGAN2 (`stylegan2-ffhq-256x256.pkl`, stylegan3
# code): the Generator init kwargs as pickled.
FFHQ_256_KWARGS = dict(
    z_dim=512,
    c_dim=0,
    w_dim=512,
    img_resolution=256,
    img_channels=3,
    mapping_kwargs=dict(num_layers=8),
    channel_base=16384,
    channel_max=512,
    num_fp16_res=4,
    conv_clamp=256,
    architecture="skip",
)


def write_random_pickle(path, init_kwargs=None, seed=0):
  """An official-format snapshot of a generator with random weights.

  Args:
    path: output file.
    init_kwargs: Generator init kwargs as NVIDIA pickles them (stylegan3
      flavour; default: the FFHQ-256 config).
    seed: seed of the weights.

  Returns:
    The path.
  """
  import torch  # pylint: disable=g-import-not-at-top

  from synthdistill_jax.convert import stylegan2 as convert_sg2  # pylint: disable=g-import-not-at-top
  from synthdistill_jax.models import stylegan2  # pylint: disable=g-import-not-at-top

  init_kwargs = dict(init_kwargs or FFHQ_256_KWARGS)
  module = stylegan2.create(
      "stylegan2", **convert_sg2._normalise_config(init_kwargs)  # pylint: disable=protected-access
  )
  rng = np.random.default_rng(seed)
  sd = {}
  for key, (_, _, shape) in convert_sg2.expected_shapes(module).items():
    torch_shape = convert_sg2._torch_shape(key, shape)  # pylint: disable=protected-access
    sd[key] = torch.from_numpy(
        rng.standard_normal(torch_shape).astype(np.float32)
    )
  res = init_kwargs["img_resolution"]
  resolutions = [2**i for i in range(2, int(np.log2(res)) + 1)]
  with fake_nvidia_modules() as fake:
    g_kwargs = dict(init_kwargs)
    g_kwargs["mapping_kwargs"] = fake.EasyDict(g_kwargs["mapping_kwargs"])
    attrs = generator_attributes(
        g_kwargs, "stylegan3", resolutions, state_attrs=False
    )
    write_pickle(path, dict(G_ema=build_tree(sd, {}, attrs, "")))
  return path


if __name__ == "__main__":
  # python -m tests.nvidia_pickles OUT.pkl: a random FFHQ-256 snapshot.
  write_random_pickle(sys.argv[1])
  print(f"wrote {sys.argv[1]}")
