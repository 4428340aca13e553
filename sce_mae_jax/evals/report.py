"""`results.json` and `report.md` of an evaluation workdir.

results.json:
    {"matching":   {ROW: {"same": float, "diff": float,              70-px mean pixel error (paper Table 1),
                          "positional": float}},                     and the descriptors' positional share
     "geometry":   {REFERENCE: {"same": float, "diff": float}},     the same pairs matched from their true points
                                                                     by where the faces sit (metrics.py)
     "detection":  {ROW: {DATASET: float}},                          100 × mean error / IOD (paper Table 2)
     "limited":    {ROW: {"1": [mean, std], "5": ..., ...}},         the same, AFLW_M, N annotations (Table 3)
     "silhouette": {ROW: [mean, std]},                               t-SNE of landmark descriptors (Fig. 5)
     "premise":    {ROW: {BLOCK: {...}}},                            attentive-split diagnostic (evals/attentive.py)
     "spread":     {"matching"|"detection": {ROW: {COLUMN: [mean, std, n]}}}   rows with replicates, over
                                                                     all of them: stage-2 seeds `ROW@seedS`
                                                                     (quickstart.py) and, in detection, regressor
                                                                     seeds `ROW@regK` (`regressor_seeds`)
     "meta":       {JOB_KEY: {"command", "config", "rows", "versions", "fingerprint", "figures", ...}}}
Several jobs may write into one workdir (the quick start does): each merges its section, and a job whose
fingerprint (config + checkpoints) is already stored returns the stored numbers instead of recomputing.
Only process 0 writes; files are replaced atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

import jax

from sce_mae_jax import fileio
from sce_mae_jax.config_lib import ROWS

RESULTS, REPORT = 'results.json', 'report.md'

# The paper's numbers (method.md §6), printed under our tables for orientation; different data, different model.
PAPER = {
    'matching': 'DeiT-T 64-d 0.47 / 1.99; DeiT-S 128-d 0.31 / 1.69; DeiT-S 256-d 0.33 / 1.72; DeiT-B 256-d '
                '0.27 / 1.61 (same / diff). Prior best: LEAD 0.51 / 2.60, CL 0.71 / 2.06.',
    'detection': 'DeiT-T 2.20 / 5.89 / 5.54 / 4.86 / 4.22; DeiT-S 2.08 / 5.33 / 5.40 / 4.69 / 3.94; DeiT-B '
                 '2.07 / 5.23 / 5.33 / 4.60 / 3.95 (MAFL / AFLW_M / AFLW_R / AFLW_RC / 300W). LEAD 2.44 / 6.05 / '
                 '5.71 / 5.11 / 4.87.',
    'limited': 'AFLW_M, 256-d: 17.08±1.35, 11.28±0.54, 10.30±0.09, 8.95±0.08, 8.20±0.20, 7.58±0.09 for '
               '1 / 5 / 10 / 20 / 50 / 100 annotations.',
}


def load(workdir: str) -> dict:
    path = os.path.join(workdir, RESULTS)
    if not fileio.exists(path):
        return {}
    return json.loads(fileio.read_text(path))


def _merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def fingerprint(config, rows) -> str:
    """Identifies an evaluation: its config and, per row, its parameters' content (`Row.digest`)."""
    blob = json.dumps([config.to_json_best_effort(sort_keys=True), [(r.name, r.digest) for r in rows]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stored(workdir: str, job_key: str, fp: str) -> dict | None:
    """The stored results of `job_key` if its fingerprint matches, else None."""
    results = load(workdir)
    if results.get('meta', {}).get(job_key, {}).get('fingerprint') == fp:
        return results
    return None


def versions() -> dict:
    import flax
    import optax
    return {'python': sys.version.split()[0], 'jax': jax.__version__, 'flax': flax.__version__,
            'optax': optax.__version__, 'backend': jax.default_backend(), 'devices': jax.device_count(),
            'processes': jax.process_count()}


def command_line() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join('sce_mae_jax', 'main.py')):
        argv[0] = 'python -m sce_mae_jax.main'
    return ' '.join(argv)


def update(workdir: str, sections: dict[str, Any], job_key: str, meta: dict, column: str | None = None) -> dict:
    """Writes `sections` (e.g. {'matching': {ROW: {...}}}) and `meta` under `job_key`, rewrites both files.

    A job replaces what it owns, so rows of an earlier run that this one skipped do not linger under its meta:
    without `column` the whole sections (and the meta `SECTION/...` of the job that wrote them before); with
    `column` (a detection set) that column of every row, the other columns (other sets' jobs) kept."""
    results = load(workdir)
    for name, section in sections.items():
        if column is None:
            results[name] = section
        else:
            for row in results.get(name, {}).values():
                row.pop(column, None)
            _merge(results.setdefault(name, {}), section)
            results[name] = {r: v for r, v in results[name].items() if v}
    if column is None:  # a section replaced whole: the meta of the job that wrote it before goes with it
        for name in sections:
            for key in [k for k in results.get('meta', {}) if k.startswith(name + '/') and k != job_key]:
                del results['meta'][key]
    results.setdefault('meta', {})[job_key] = {'command': command_line(), 'versions': versions(), **meta}
    results['spread'] = {name: spread(results[name]) for name in ('matching', 'detection') if name in results}
    results['spread'] = {k: v for k, v in results['spread'].items() if v}
    if jax.process_index() == 0:
        fileio.makedirs(workdir)
        fileio.write_text(os.path.join(workdir, RESULTS), json.dumps(results, indent=2, sort_keys=True))
        fileio.write_text(os.path.join(workdir, REPORT), render(results))
    return results


def _rows(section: dict) -> list[str]:
    return [r for r in ROWS if r in section] + sorted(r for r in section if r not in ROWS)


SEED_MARK = '@seed'  # 'ROW@seedS': a replicate of ROW trained with another seed (quickstart.stage2_runs)
REGRESSOR_MARK = '@reg'  # 'ROW@regK': ROW's detection regressor trained with seed + K (detection.run)


def base_row(name: str) -> str:
    """The row a result belongs to: 'sce_mae' for 'sce_mae', 'sce_mae@seed1' and 'mae@reg2' alike."""
    return name.partition('@')[0]


def is_replicate(name: str) -> bool:
    return base_row(name) != name


def spread(section: dict) -> dict:
    """{ROW: {COLUMN: [mean, std, n]}} for every row that has replicates (`ROW@seedS`, `ROW@regK`) in `section`
    ({ROW: {COLUMN: float}}): the row itself and its replicates, std with n − 1 (0 for n = 1)."""
    out = {}
    for row in section:
        reps = [r for r in section if is_replicate(r) and base_row(r) == row]
        if is_replicate(row) or not reps:
            continue
        cols = {}
        for col, value in section[row].items():
            vals = [section[r].get(col) for r in [row, *reps]]
            vals = [v for v in vals if isinstance(v, (int, float))]
            if vals:
                mean = sum(vals) / len(vals)
                var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
                cols[col] = [mean, var ** 0.5, len(vals)]
        out[row] = cols
    return out


def _values(section: dict, row: str, column: str) -> list[float]:
    return [section[x][column] for x in section if base_row(x) == row and isinstance(section[x].get(column),
                                                                                     (int, float))]


def versus(section: dict, row: str, reference: str, column: str) -> str | None:
    """How `row` (over its replicates) compares with `reference` in `column`, lower being better: 'better' or
    'worse' only when every run lies on that side of the reference's value (or its runs' range) and the means
    differ by more than the larger std; else 'no difference'. None when either is missing."""
    a, b = _values(section, row, column), _values(section, reference, column)
    if not a or not b:
        return None
    spreads = [v[column][1] for v in spread({k: section[k] for k in section
                                              if base_row(k) in (row, reference)}).values()
               if column in v]
    gap = sum(a) / len(a) - sum(b) / len(b)
    if max(a) < min(b) and -gap > max(spreads, default=0.0):
        return 'better'
    if min(a) > max(b) and gap > max(spreads, default=0.0):
        return 'worse'
    return 'no difference'


def _with_spread(section: dict) -> dict:
    """The section as the report shows it: a row with replicates as [mean, std] (where a column has more than
    one run), replicates folded in."""
    folded = spread(section)
    return {r: ({c: v[:2] if v[2] > 1 else v[0] for c, v in folded[r].items()} if r in folded else v)
            for r, v in section.items() if not is_replicate(r)}


def _fmt(v, digits: int = 2) -> str:
    if isinstance(v, (list, tuple)):
        return f'{v[0]:.{digits}f} ± {v[1]:.{digits}f}'
    return '–' if v is None else f'{v:.{digits}f}'


def _table(section: dict, columns: list[str], header: list[str], digits: dict | None = None) -> list[str]:
    out = ['| row | ' + ' | '.join(header) + ' |', '|---|' + '---|' * len(header)]
    for r in _rows(section):
        out.append(f'| `{r}` | ' + ' | '.join(_fmt(section[r].get(c), (digits or {}).get(c, 2)) for c in columns)
                   + ' |')
    return out


def _verdicts(section: dict, columns: list[str], *, trained: bool = False) -> list[str]:
    """Under a table with replicates: each row with replicates against `mae`, column by column (`versus`).
    `trained`: every number comes out of a trained regressor (detection), so a `mae` of one regressor has an
    unknown spread of its own and no verdict is given against it."""
    folded = spread(section)
    if not folded:
        return []
    def count(r):
        lo, hi = min(v[2] for v in folded[r].values()), max(v[2] for v in folded[r].values())
        return f'{lo}' if lo == hi else f'{lo}-{hi}'
    runs = ', '.join(f'`{r}` {count(r)}' for r in _rows(folded))
    lines = ['', f'Rows with replicates show mean ± std over their runs ({runs}: stage-2 seeds `@seedS`'
             + (', regressor seeds `@regK`' if trained else '') + ').', '']
    # a trained `mae` is judged against only where it has runs of its own to show its spread, column by column
    single = [c for c in columns if trained and len(_values(section, 'mae', c)) == 1]
    if single:
        lines += [f'`mae` has a single regressor on {", ".join(single)}, whose seed-to-seed spread is unknown: no '
                  'verdict against it there (`--config.regressor_seeds=3` trains every row without stage-2 '
                  'replicates three times).', '']
    judged = [c for c in columns if c not in single]
    if not judged:
        return lines[:-1]
    return lines + _against_mae(section, [r for r in _rows(folded) if r != 'mae'], judged, 'Against `mae`')


def _against_mae(section: dict, rows: list[str], columns: list[str], intro: str, label=str) -> list[str]:
    """`intro` and the rule, then one line per row of `rows` with its `versus` `mae` in each column."""
    lines = [f'{intro} (lower is better; a difference counts only when every run is on the same side and the means '
             'differ by more than the larger std):', '']
    for row in rows:
        said = [f'{label(c)} {v}' for c in columns if (v := versus(section, row, 'mae', c))]
        if said:
            lines.append(f'- `{row}`: ' + ', '.join(said))
    return lines


def limited_runs(results: dict) -> dict:
    """The limited-annotation runs as a section {ROW or ROW@drawI: {N: error}}: every draw of every row (and of
    its stage-2 replicates) a run of the row, so `versus` can weigh them; {} without runs."""
    runs = next((v['runs'] for k, v in sorted(results.get('meta', {}).items())
                 if k.startswith('limited/') and 'runs' in v), {})
    out = {}
    for row, per_n in runs.items():
        for n, errs in per_n.items():
            for i, err in enumerate(errs):
                out.setdefault(row if i == 0 else f'{row}@draw{i}', {})[n] = err
    return out


def render(results: dict) -> str:
    """report.md: the paper's table layouts, our numbers, the paper's below them, figures inline."""
    meta = results.get('meta', {})
    lines = ['# Evaluation report', '',
             'Numbers measured by the jobs listed at the end (commands, checkpoints, versions in results.json). '
             'The paper\'s numbers are on real data with 400-epoch backbones: they orient, they do not compare.', '']
    if 'matching' in results:
        m = meta.get('matching', {})
        lines += ['## Landmark matching (paper Table 1)', '',
                  f'Mean pixel error in the 70-px frame (CL: error at 96 px × 69/95), {m.get("pairs", "?")} pairs '
                  f'of `{m.get("data", "?")}` (half same identity, half different), features at stride '
                  f'{m.get("stride", "?")} upsampled to 96 px. Lower is better. Positional share: the part of '
                  'the descriptors\' variance that the place in the frame alone explains (1: `positions`, a pure '
                  'position code; `evals/matching.positional_share`).', '']
        lines += _table(_with_spread(results['matching']), ['same', 'diff', 'positional'],
                        ['same identity', 'different identity', 'positional share'], {'positional': 3})
        lines += _verdicts(results['matching'], ['same', 'diff'])
        if 'geometry' in results:
            g = results['geometry']
            lines += ['', 'What the pairs allow (references from the true points, not descriptors; '
                      '`evals/metrics.geometry_predictions`): the source\'s pixel (`same_place`, what a perfect '
                      'position code scores), the source\'s points moved with the face (`face_translation`) '
                      'and mapped by the faces\' similarity transform (`face_similarity`). Where `same_place` is '
                      'not well above the other two, a position code matches as well as content can.', '',
                      '| reference | same identity | different identity |', '|---|---|---|']
            lines += [f'| `{r}` | {_fmt(g[r].get("same"))} | {_fmt(g[r].get("diff"))} |' for r in g]
        lines += ['', f'Paper: {PAPER["matching"]}', '']
    if 'silhouette' in results:
        lines += ['## Landmark descriptors (paper Fig. 5)', '',
                  'Silhouette coefficient of the five landmarks\' descriptors in a 2-D t-SNE (mean ± std over '
                  't-SNE runs; higher: landmarks form tighter, better separated clusters).', '',
                  '| row | silhouette |', '|---|---|']
        lines += [f'| `{r}` | {_fmt(results["silhouette"][r])} |' for r in _rows(results['silhouette'])]
        lines += ['']
    if 'detection' in results:
        sets = sorted({d for v in results['detection'].values() for d in v})
        lines += ['## Landmark detection (paper Table 2)', '',
                  '100 × mean(‖pred − gt‖ / inter-ocular distance): eye centres for 5-point sets, outer eye '
                  'corners (36, 45) for 68 points. Frozen features, trained regressor. Lower is better.', '']
        lines += _table(_with_spread(results['detection']), sets, sets)
        lines += _verdicts(results['detection'], sets, trained=True)
        lines += ['', f'Paper: {PAPER["detection"]}', '']
    if 'limited' in results:
        ns = sorted({n for v in results['limited'].values() for n in v}, key=int)
        lines += ['## Limited annotations (paper Table 3)', '',
                  'The detection error with N annotated training images, mean ± std over seeds.', '']
        lines += _table(results['limited'], ns, [f'{n}' for n in ns])
        runs = limited_runs(results)
        if len(_values(runs, 'mae', ns[0])) > 1:
            lines += [''] + _against_mae(
                runs, [r for r in _rows(runs) if r != 'mae' and not is_replicate(r)], ns,
                'Against `mae`, each row over all its runs, draws × stage-2 seeds', label=lambda n: f'N = {n}')
        lines += ['', f'Paper: {PAPER["limited"]}', '']
    if 'premise' in results:
        lines += ['## Do attentive tokens cover the landmarks? (paper §3.2 premise)', '',
                  'Eq. 1\'s split at every block on the target faces: the share of attentive tokens whose 8x8 cell '
                  'holds one of the 5 landmarks (chance: the share of all tokens that do), recall (landmark cells '
                  'that are attentive; the paper\'s premise is 100% at the clustering block) and the share of '
                  'attentive tokens on the cells most often attentive over the images (100%: fixed positions, '
                  'whatever the face).', '']
        blocks = sorted({b for v in results['premise'].values() for b in v}, key=int)
        lines += ['Each cell: attentive tokens on one of the 5 landmarks / chance (all tokens on one of the 5), '
                  'landmark recall, share on fixed cells. (`python -m sce_mae_jax.evals.attentive` counts the 68 '
                  'points for coverage and chance, so its chance is higher.)', '',
                  '| row | ' + ' | '.join(f'block {b}' for b in blocks) + ' |', '|---|' + '---|' * len(blocks)]
        for r in _rows(results['premise']):
            cells = [results['premise'][r].get(b) for b in blocks]
            lines.append(f'| `{r}` | ' + ' | '.join(
                '–' if v is None else f'{100 * v["coverage"]:.1f}% / {100 * v["chance"]:.1f}%, '
                f'{100 * v["recall"]:.0f}%, {100 * v["concentration"]:.0f}%' for v in cells) + ' |')
        lines += ['']
    figs = [(k, f) for k, v in meta.items() for f in v.get('figures', [])]
    if figs:
        lines += ['## Figures', '']
        for key, (title, path) in figs:
            lines += [f'**{title}** ({key})', '', f'![{title}]({path})', '']
    if meta:
        lines += ['## Jobs', '']
        lines += [f'- `{k}`: `{v.get("command", "")}`' for k, v in sorted(meta.items())]
        skipped = sorted({s for v in meta.values() for s in v.get('skipped_rows', [])})
        if skipped:
            lines += ['', 'Rows left out (no workdir given): ' + ', '.join(skipped)]
    return '\n'.join(lines) + '\n'
