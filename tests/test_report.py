"""report.md as evals/report.py renders it from results.json."""
from sce_mae_jax.evals import report


def test_premise_table_says_which_landmarks_chance_counts():
    results = {'premise': {'mae': {'0': {'coverage': 0.05, 'chance': 0.035, 'recall': 0.2, 'concentration': 0.7}}}}
    text = report.render(results)
    assert 'attentive tokens on one of the 5 landmarks / chance (all tokens on one of the 5)' in text
    assert 'counts the 68 points for coverage and chance' in text
    assert '| `mae` | 5.0% / 3.5%, 20%, 70% |' in text


def _verdict_lines(text: str, title: str) -> list[str]:
    section = text.split(title, 1)[1].split('\n## ', 1)[0]
    return [line for line in section.splitlines() if line.startswith(('- `', '`mae` has', 'Rows with'))]


def test_detection_gives_no_verdict_against_a_single_mae_regressor():
    # the case docs/results.md found: three stage-2 seeds below one mae regressor whose own seeds spread wider
    detection = {'mae': {'s5': 11.79}, 'sce_mae': {'s5': 11.71}, 'sce_mae@seed1': {'s5': 11.56},
                 'sce_mae@seed2': {'s5': 11.69}}
    lines = _verdict_lines(report.render({'detection': detection}), 'Landmark detection')
    assert lines[-1].startswith('`mae` has a single regressor') and not any(x.startswith('- `') for x in lines)
    # with mae's regressor seeds (mae@regK) it is judged, over the runs of both
    detection.update({'mae@reg1': {'s5': 11.77}, 'mae@reg2': {'s5': 11.53}})
    lines = _verdict_lines(report.render({'detection': detection}), 'Landmark detection')
    assert lines[0].startswith('Rows with replicates show mean ± std over their runs (`mae` 3, `sce_mae` 3')
    assert '- `sce_mae`: s5 no difference' in lines
    assert report.spread(detection)['mae']['s5'][2] == 3
    detection.update({'sce_mae': {'s5': 11.2}, 'sce_mae@seed1': {'s5': 11.3}, 'sce_mae@seed2': {'s5': 11.25}})
    assert '- `sce_mae`: s5 better' in _verdict_lines(report.render({'detection': detection}), 'Landmark detection')


def test_matching_judges_against_a_single_mae():
    # matching trains nothing at evaluation: one mae is exact, so the stage-2 seeds are judged against it
    matching = {'mae': {'same': 1.0, 'diff': 5.0}, 'sce_mae': {'same': 1.2, 'diff': 4.0},
                'sce_mae@seed1': {'same': 1.3, 'diff': 4.1}}
    lines = _verdict_lines(report.render({'matching': matching}), 'Landmark matching')
    assert '- `sce_mae`: same worse, diff better' in lines


def test_limited_verdicts_weigh_every_draw_of_every_stage2_seed():
    runs = {'mae': {'10': [41.0, 38.0, 44.0]}, 'sce_mae': {'10': [34.0, 33.0, 35.0]},
            'sce_mae@seed1': {'10': [33.5, 34.5, 32.5]}, 'other': {'10': [40.0, 43.0, 39.0]}}
    results = {'limited': {r: {'10': [sum(v['10']) / 3, 1.0]} for r, v in runs.items()},
               'meta': {'limited/s5': {'runs': runs}}}
    section = report.limited_runs(results)
    assert len(report._values(section, 'sce_mae', '10')) == 6 and len(report._values(section, 'mae', '10')) == 3
    lines = _verdict_lines(report.render(results), 'Limited annotations')
    assert lines == ['- `sce_mae`: N = 10 better', '- `other`: N = 10 no difference']
    # one draw per row: nothing to weigh, no verdict
    one = {r: {'10': v['10'][:1]} for r, v in runs.items()}
    assert _verdict_lines(report.render({**results, 'meta': {'limited/s5': {'runs': one}}}),
                          'Limited annotations') == []


def test_detection_withholds_the_verdict_only_on_sets_where_mae_has_one_regressor():
    # a5 run with regressor_seeds=3, b68 earlier with 1 (`--config.only` runs one set at a time)
    detection = {'mae': {'a5': 11.0, 'b68': 10.0}, 'mae@reg1': {'a5': 11.1}, 'mae@reg2': {'a5': 10.9},
                 'sce_mae': {'a5': 9.0, 'b68': 9.0}, 'sce_mae@seed1': {'a5': 9.1, 'b68': 9.1}}
    text = report.render({'detection': detection})
    lines = _verdict_lines(text, 'Landmark detection')
    assert '(`mae` 1-3, `sce_mae` 2: ' in lines[0]
    assert lines[1].startswith('`mae` has a single regressor on b68,') and lines[-1] == '- `sce_mae`: a5 better'
    assert '| `mae` | 11.00 ± 0.10 | 10.00 |' in text   # one run: no "± 0.00"


def test_a_section_replaced_whole_drops_the_meta_of_the_job_that_wrote_it(tmp_path, monkeypatch):
    # limited annotations on one set, then on another: the verdicts read the runs of the job whose table is shown
    monkeypatch.setattr(report, 'versions', lambda: {})
    old = {'mae': {'10': [50.0, 52.0, 51.0]}, 'sce_mae': {'10': [41.0, 40.0, 42.0]}}
    new = {'mae': {'10': [31.0, 30.0, 32.0]}, 'sce_mae': {'10': [41.0, 40.0, 42.0]}}
    for key, runs in (('limited/aflw_m', old), ('limited/synthetic_5', new)):
        table = {r: {'10': [sum(v['10']) / 3, 1.0]} for r, v in runs.items()}
        results = report.update(str(tmp_path), {'limited': table}, job_key=key, meta={'runs': runs})
    assert sorted(results['meta']) == ['limited/synthetic_5']
    assert _verdict_lines(open(tmp_path / 'report.md').read(), 'Limited annotations') == [
        '- `sce_mae`: N = 10 worse']
