"""The VAR transformer (official `models/var.py`) in flax.nnx, and its checkpoint loader.

`VAR(labels_B, var_input_BlC)` is the teacher-forced forward (block-causal mask over the whole
pyramid) and returns fp32 logits (B, L, V). Cached sampling (`var_jax.sampling`) drives the same
blocks scale by scale through `VAR.embed_first`, `VAR.embed_next`, `VAR.backbone` and `VAR.logits`.

Parameter names follow the official module tree (`blocks.{i}.attn.mat_qkv`, `head_nm.ada_lin`, ...)
so `load_var_state_dict` maps an official state dict one to one (Linear weights are transposed).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.blocks import AdaLNBeforeHead, AdaLNSelfAttn, linear, softmax_attention, trunc_normal
from var_jax.blocks import INIT_HEAD, init_std
from var_jax.config import VARConfig

Array = jax.Array
# attend(layer, q_BHSD, k_BHSD, v_BHSD) -> (out_BHSD, aux)
LayerAttendFn = Callable[[int, Array, Array, Array], tuple[Array, Any]]


def scale_ids(patch_nums: Sequence[int]) -> np.ndarray:
  """(L,) int32: the scale index of every token of the pyramid (official `lvl_1L`)."""
  return np.concatenate([np.full(pn * pn, i, np.int32) for i, pn in enumerate(patch_nums)])


def block_causal_mask(patch_nums: Sequence[int]) -> np.ndarray:
  """(L, L) bool: token s sees token t iff scale(t) <= scale(s) (official `attn_bias_for_masking`)."""
  ids = scale_ids(patch_nums)
  return ids[:, None] >= ids[None, :]


class VAR(nnx.Module):
  """Class-conditional next-scale prediction transformer (official `VAR`)."""

  def __init__(self, cfg: VARConfig, *, rngs: nnx.Rngs):
    if cfg.width % cfg.num_heads:
      raise ValueError(f'width {cfg.width} is not divisible by num_heads {cfg.num_heads}; pick a '
                       'head count that divides the width (official: heads = depth, width = 64*depth)')
    self.cfg = cfg
    c, std, first_l = cfg.width, init_std(cfg), cfg.patch_nums[0] ** 2
    tn = jax.nn.initializers.truncated_normal(stddev=std)
    self.word_embed = linear(cfg.z_channels, c, rngs, kernel_init=trunc_normal(std))
    self.class_emb = nnx.Embed(cfg.num_classes + 1, c, embedding_init=tn, rngs=rngs)
    self.pos_start = nnx.Param(tn(rngs.params(), (1, first_l, c), jnp.float32))
    self.pos_1LC = nnx.Param(tn(rngs.params(), (1, cfg.seq_len, c), jnp.float32))
    self.lvl_embed = nnx.Embed(len(cfg.patch_nums), c, embedding_init=tn, rngs=rngs)
    self.shared_ada_lin = (linear(c, 6 * c, rngs, kernel_init=trunc_normal(std))
                           if cfg.shared_aln else None)
    self.blocks = nnx.List([AdaLNSelfAttn(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.head_nm = AdaLNBeforeHead(cfg, rngs=rngs)
    self.head = linear(c, cfg.vocab_size, rngs, kernel_init=trunc_normal(std, INIT_HEAD))

  # ----------------------------------------------------------------------------- pieces
  def cond(self, labels_B: Array) -> Array:
    """Class embedding cond_BD (label `num_classes` is the null class)."""
    return self.class_emb(labels_B)

  def block_cond(self, cond_BD: Array) -> Array:
    """What each block's modulation takes: cond_BD, or the shared (B, 1, 6, C) when `shared_aln`."""
    if self.shared_ada_lin is None:
      return cond_BD
    return einops.rearrange(self.shared_ada_lin(jax.nn.silu(cond_BD)), 'b (six c) -> b 1 six c', six=6)

  def lvl_pos(self, begin: int, end: int) -> Array:
    """(1, end - begin, C): level embedding plus absolute position of tokens [begin, end)."""
    ids = jnp.asarray(scale_ids(self.cfg.patch_nums)[begin:end])
    return self.lvl_embed(ids)[None] + self.pos_1LC[:, begin:end]

  def embed_first(self, cond_BD: Array) -> Array:
    """(B, pn0^2, C): input tokens of the first scale (start-of-sequence from the class)."""
    first_l = self.cfg.patch_nums[0] ** 2
    return cond_BD[:, None, :] + self.pos_start[...] + self.lvl_pos(0, first_l)

  def embed_next(self, scale: int, next_BlCv: Array) -> Array:
    """(B, pn^2, C): input tokens of `scale` >= 1 from VQ-VAE features (B, pn^2, Cvae)."""
    begin, end = self.cfg.begin_ends[scale]
    return self.word_embed(next_BlCv) + self.lvl_pos(begin, end)

  def conditioning(self, cond_BD: Array) -> dict[str, Any]:
    """What every scale takes from the class: {'cond': cond_BD, 'blocks': each block's AdaLN
    modulation (B, 1, 6, C), 'head': head_nm's (B, 1, 2, C)}. Generation computes it once per call and
    passes it to every scale (`backbone(..., mods=c['blocks'])`, `logits(..., head_mod=c['head'])`):
    the AdaLN weights (6C^2 per block, a third of the model) are then read once, not once per scale."""
    cond = self.block_cond(cond_BD)
    return {'cond': cond_BD, 'blocks': tuple(block.modulation(cond) for block in self.blocks),
            'head': self.head_nm.modulation(cond_BD.astype(jnp.float32))}

  def backbone(self, x_BLC: Array, cond_BD: Array, attend: LayerAttendFn,
               mods: tuple[Array, ...] | None = None) -> tuple[Array, list[Any]]:
    """All blocks; `attend(layer, q, k, v)` decides what the queries see; `mods`: the blocks'
    modulations from `conditioning` (else computed here). Returns (h_BLC, auxes)."""
    cond = self.block_cond(cond_BD) if mods is None else None
    auxes = []
    for layer, block in enumerate(self.blocks):
      x_BLC, aux = block(x_BLC, cond, lambda q, k, v, layer=layer: attend(layer, q, k, v),
                         None if mods is None else mods[layer])
      auxes.append(aux)
    return x_BLC, auxes

  def logits(self, h_BLC: Array, cond_BD: Array, head_mod: Array | None = None) -> Array:
    """(B, L, V) fp32: AdaLN head then Linear; `head_mod`: head_nm's modulation from `conditioning`."""
    h_BLC = self.head_nm(h_BLC.astype(jnp.float32), cond_BD.astype(jnp.float32), head_mod)
    return self.head(h_BLC).astype(jnp.float32)

  # ----------------------------------------------------------------------------- forward
  def __call__(self, labels_B: Array, var_input_BlC: Array, *, cond_drop_key: Array | None = None) -> Array:
    """Teacher forcing. labels (B,) int; var_input (B, L - pn0^2, Cvae) -> logits (B, L, V) fp32.

    With `cond_drop_key`, each label is replaced by the null class with prob `cfg.cond_drop_rate`.
    """
    cfg = self.cfg
    b, first_l = labels_B.shape[0], cfg.patch_nums[0] ** 2
    want = (b, cfg.seq_len - first_l, cfg.z_channels)
    if tuple(var_input_BlC.shape) != want:
      raise ValueError(f'var_input has shape {tuple(var_input_BlC.shape)}, expected {want} '
                       f'(B, L - pn0^2, Cvae) for patch_nums {cfg.patch_nums}; build it with '
                       'VQVAE.idx_to_var_input')
    if cond_drop_key is not None:
      drop_B = jax.random.uniform(cond_drop_key, (b,)) < cfg.cond_drop_rate
      labels_B = jnp.where(drop_B, cfg.num_classes, labels_B)
    cond_BD = self.cond(labels_B)
    sos_BlC = cond_BD[:, None, :] + self.pos_start[...]
    x_BLC = jnp.concatenate([sos_BlC, self.word_embed(var_input_BlC.astype(jnp.float32))], axis=1)
    x_BLC = x_BLC + self.lvl_pos(0, cfg.seq_len)
    mask_LL = jnp.asarray(block_causal_mask(cfg.patch_nums))
    dense = lambda layer, q, k, v: (softmax_attention(q, k, v, mask_LL), None)
    h_BLC, _ = self.backbone(x_BLC, cond_BD, dense)
    return self.logits(h_BLC, cond_BD)


# ------------------------------------------------------------------------------- checkpoints
_BUFFERS = ('lvl_1L', 'attn_bias_for_masking')      # official non-parameter buffers, recomputed here


def _official_params(model: VAR) -> dict[str, tuple[nnx.Variable, bool]]:
  """Official name -> (variable, transposed) for every parameter of `model`."""
  out: dict[str, tuple[nnx.Variable, bool]] = {}

  def lin(name: str, m: nnx.Linear) -> None:
    out[f'{name}.weight'] = (m.kernel, True)
    if m.bias is not None:
      out[f'{name}.bias'] = (m.bias, False)

  lin('word_embed', model.word_embed)
  out['class_emb.weight'] = (model.class_emb.embedding, False)
  out['pos_start'] = (model.pos_start, False)
  out['pos_1LC'] = (model.pos_1LC, False)
  out['lvl_embed.weight'] = (model.lvl_embed.embedding, False)
  if model.shared_ada_lin is not None:
    lin('shared_ada_lin.1', model.shared_ada_lin)
  for i, blk in enumerate(model.blocks):
    p = f'blocks.{i}'
    if model.cfg.attn_l2_norm:
      out[f'{p}.attn.scale_mul_1H11'] = (blk.attn.scale_mul_1H11, False)
    out[f'{p}.attn.q_bias'] = (blk.attn.q_bias, False)
    out[f'{p}.attn.v_bias'] = (blk.attn.v_bias, False)
    lin(f'{p}.attn.mat_qkv', blk.attn.mat_qkv)
    lin(f'{p}.attn.proj', blk.attn.proj)
    lin(f'{p}.ffn.fc1', blk.ffn.fc1)
    lin(f'{p}.ffn.fc2', blk.ffn.fc2)
    if model.cfg.shared_aln:
      out[f'{p}.ada_gss'] = (blk.ada_gss, False)
    else:
      lin(f'{p}.ada_lin.1', blk.ada_lin)
  lin('head_nm.ada_lin.1', model.head_nm.ada_lin)
  lin('head', model.head)
  return out


def _is_buffer(name: str) -> bool:
  return name in _BUFFERS or name.endswith('.attn.zero_k_bias')


def load_var_state_dict(model: VAR, sd: dict[str, np.ndarray]) -> None:
  """Copies an official VAR state dict (name -> array) into `model` in place.

  Raises ValueError naming every missing, unexpected and mis-shaped key. Buffers (`lvl_1L`,
  `attn_bias_for_masking`, `*.attn.zero_k_bias`) are recomputed here and skipped; a non-zero
  `zero_k_bias` is refused since the official forward would add it to the keys.
  """
  params = _official_params(model)
  missing = sorted(set(params) - set(sd))
  unexpected = sorted(k for k in sd if k not in params and not _is_buffer(k))
  bad_shape = []
  for name, (var, transposed) in params.items():
    if name in sd:
      shape = tuple(var.get_value().shape)
      want = shape[::-1] if transposed else shape
      if tuple(np.shape(sd[name])) != want:
        bad_shape.append(f'{name}: expected {want}, got {tuple(np.shape(sd[name]))}')
  nonzero_k_bias = sorted(k for k in sd if k.endswith('.attn.zero_k_bias') and np.any(np.asarray(sd[k]) != 0))
  problems = []
  if missing:
    problems.append(f'missing keys {missing}')
  if unexpected:
    problems.append(f'unexpected keys {unexpected}')
  if bad_shape:
    problems.append('mis-shaped keys [' + '; '.join(bad_shape) + ']')
  if nonzero_k_bias:
    problems.append(f'non-zero key biases {nonzero_k_bias} (the port assumes keys have no bias)')
  if problems:
    raise ValueError('VAR state dict does not fit the model: ' + ', '.join(problems) +
                     f'. Build the model with infer_var_config(sd, patch_nums) (model config: {model.cfg}).')
  for name, (var, transposed) in params.items():
    arr = np.asarray(sd[name], dtype=np.float32)
    var.set_value(jnp.asarray(arr.T if transposed else arr))


def var_from_state_dict(sd: dict[str, np.ndarray], patch_nums: Sequence[int], **overrides: Any) -> VAR:
  """A VAR built from an official state dict without random init (abstract build, then load)."""
  model = nnx.eval_shape(lambda: VAR(infer_var_config(sd, patch_nums, **overrides), rngs=nnx.Rngs(0)))
  load_var_state_dict(model, sd)
  abstract = [p for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(model))
              if isinstance(x, jax.ShapeDtypeStruct)]
  if abstract:
    raise RuntimeError(f'VAR variables {abstract} were not loaded; the loader misses them')
  return model


def var_state_dict(model: VAR) -> dict[str, Any]:
  """The parameters of `model` as an official state dict (name -> fp32 array, torch layouts).

  For an abstract model (`nnx.eval_shape`) the values are `jax.ShapeDtypeStruct`s in torch layout.
  """
  out: dict[str, Any] = {}
  for name, (var, transposed) in _official_params(model).items():
    x = var.get_value()
    if isinstance(x, jax.ShapeDtypeStruct):
      out[name] = jax.ShapeDtypeStruct(x.shape[::-1] if transposed else x.shape, x.dtype)
    else:
      out[name] = np.asarray(x).T if transposed else np.asarray(x)
  return out


def infer_var_config(sd: dict[str, np.ndarray], patch_nums: Sequence[int], **overrides: Any) -> VARConfig:
  """The VARConfig of an official state dict for the given `patch_nums` (which it cannot store)."""
  patch_nums = tuple(int(p) for p in patch_nums)
  need = ['word_embed.weight', 'class_emb.weight', 'pos_1LC', 'pos_start', 'lvl_embed.weight',
          'head.weight', 'blocks.0.ffn.fc1.weight']
  absent = [k for k in need if k not in sd]
  if absent:
    raise ValueError(f'not an official VAR state dict: keys {absent} are missing')
  width, z_channels = np.shape(sd['word_embed.weight'])
  depth = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.'))
  attn_l2_norm = 'blocks.0.attn.scale_mul_1H11' in sd
  num_heads = int(np.shape(sd['blocks.0.attn.scale_mul_1H11'])[1]) if attn_l2_norm else width // 64
  seq_len = sum(pn * pn for pn in patch_nums)
  ckpt_len, ckpt_first = np.shape(sd['pos_1LC'])[1], np.shape(sd['pos_start'])[1]
  ckpt_scales = np.shape(sd['lvl_embed.weight'])[0]
  if (ckpt_len, ckpt_first, ckpt_scales) != (seq_len, patch_nums[0] ** 2, len(patch_nums)):
    raise ValueError(
        f'patch_nums {patch_nums} do not fit the checkpoint: it has {ckpt_len} positions (pos_1LC), '
        f'{ckpt_first} first-scale tokens (pos_start) and {ckpt_scales} scales (lvl_embed), but '
        f'patch_nums give {seq_len}, {patch_nums[0] ** 2} and {len(patch_nums)}. Pass the schedule '
        'the model was trained with (256px: config.PATCH_NUMS_256, 512px: config.PATCH_NUMS_512).')
  kw = dict(depth=depth, width=int(width), num_heads=num_heads,
            mlp_ratio=np.shape(sd['blocks.0.ffn.fc1.weight'])[0] / width,
            num_classes=int(np.shape(sd['class_emb.weight'])[0]) - 1,
            vocab_size=int(np.shape(sd['head.weight'])[0]), z_channels=int(z_channels),
            patch_nums=patch_nums, attn_l2_norm=attn_l2_norm,
            shared_aln='shared_ada_lin.1.weight' in sd)
  kw.update(overrides)
  return VARConfig(**kw)
