"""`prepare --dataset=synthetic`: the stored faces are the rendered ones, and get_source reads them from the
data_dir they were prepared in (and renders where they are not)."""
import numpy as np
import pytest

from sce_mae_jax.data import pipeline, prepare, sources
from sce_mae_jax.data.synthetic import SyntheticFaces

N = 6


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp('tfds')
    assert prepare.main(['--dataset=synthetic', f'--data_dir={out}', f'--num_examples={N}', '--seed=3']) == 0
    return out


def test_prepared_faces_are_the_rendered_ones(data_dir):
    src = sources.get_source('synthetic', 'pretrain', data_dir=data_dir, seed=3)
    assert type(src).__name__ == 'PreparedFaces' and len(src) == N
    assert (src.num_landmarks, src.iod_indices) == (5, (0, 1))
    rendered = SyntheticFaces('pretrain', seed=3)
    for i in (0, N - 1, -1):
        got, want = src[i], rendered[i % N]
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert src.identity_of(4) == rendered.identity_of(4)
    with pytest.raises(IndexError):
        src[N]


def test_images_read_a_batch_at_a_time_are_the_records_images(data_dir):
    """`read_images` skips TFDS's decoding of the other features: the same pixels, in the order asked, and the
    training pipeline's images-only batches (which use it, in this process or in a grain worker) are those of
    the item-by-item path."""
    src = sources.get_source('synthetic', 'pretrain', data_dir=data_dir, seed=3)
    order = [4, 0, 5, 4, 2]
    images = src.read_images(order)
    assert images.shape == (5, 136, 136, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, np.stack([src[i]['image'] for i in order]))
    plain = pipeline.train_iterator(src, global_batch=4, seed=1, transform=None)
    mapped = pipeline.train_iterator(src, global_batch=4, seed=1, transform=lambda e, r: {'image': e['image']})
    in_worker = pipeline.train_iterator(src, global_batch=4, seed=1, transform=None, num_workers=1)
    for _ in range(4):  # 16 positions over 6 faces: crosses two reshuffles, one batch straddles an epoch
        batch = next(plain)['image']
        np.testing.assert_array_equal(batch, next(mapped)['image'])
        np.testing.assert_array_equal(batch, next(in_worker)['image'])  # the source pickled into a worker


def test_shards_are_stored_uncompressed_and_a_compressed_one_reads_the_same(data_dir):
    from array_record.python import array_record_module as ar
    builder = sources.prepare_synthetic('synthetic', data_dir=data_dir, seed=3, num_examples=N)
    shards = sorted(builder.data_path.glob('*.array_record-*'))
    assert shards and all('uncompressed' in ar.ArrayRecordReader(str(p)).writer_options_string() for p in shards)
    before = [sources.get_source('synthetic', 'pretrain', data_dir=data_dir, seed=3)[i]['image'] for i in range(N)]
    # a shard as TFDS writes it (zstd), from a dataset prepared before the rewrite: read as it is, then rewritten
    shard = next(p for p in shards if 'pretrain' in p.name)
    reader = ar.ArrayRecordReader(str(shard))
    records = reader.read(list(range(reader.num_records())))
    writer = ar.ArrayRecordWriter(str(shard), 'group_size:1')
    for r in records:
        writer.write(r)
    writer.close()
    assert 'zstd' in ar.ArrayRecordReader(str(shard)).writer_options_string()
    src = sources.get_source('synthetic', 'pretrain', data_dir=data_dir, seed=3)
    for i in range(N):
        np.testing.assert_array_equal(src[i]['image'], before[i])
    # preparing again rewrites it
    assert prepare.main(['--dataset=synthetic', f'--data_dir={data_dir}', f'--num_examples={N}', '--seed=3']) == 0
    assert 'uncompressed' in ar.ArrayRecordReader(str(shard)).writer_options_string()
    assert not list(builder.data_path.glob('*.tmp'))
    src = sources.get_source('synthetic', 'pretrain', data_dir=data_dir, seed=3)
    for i in range(N):
        np.testing.assert_array_equal(src[i]['image'], before[i])


def test_other_seeds_and_no_data_dir_are_rendered(data_dir):
    assert type(sources.get_source('synthetic', 'match', data_dir=data_dir, seed=0)) is SyntheticFaces
    assert type(sources.get_source('synthetic_plain', 'match', data_dir=data_dir, seed=3)) is SyntheticFaces
    assert type(sources.get_source('synthetic', 'match', seed=3)) is SyntheticFaces


def test_a_different_size_is_refused(data_dir):
    with pytest.raises(sources.DatasetError, match='already prepared'):
        sources.prepare_synthetic('synthetic', data_dir=data_dir, seed=3, num_examples=N + 1)


def test_the_training_pipeline_reads_it_with_workers(data_dir):
    src = sources.get_source('synthetic', 'train', data_dir=data_dir, seed=3)
    it = pipeline.train_iterator(src, global_batch=4, seed=0, num_workers=1,
                                 transform=pipeline.pretrain_augment(32))
    assert next(it)['image'].shape == (4, 32, 32, 3)


def test_real_datasets_still_need_a_manual_dir(capsys):
    with pytest.raises(SystemExit):
        prepare.main(['--dataset=mafl'])
    assert '--manual_dir is required' in capsys.readouterr().err


def test_bench_input_times_every_stage(data_dir, capsys):
    from sce_mae_jax import bench, config_lib
    config = config_lib.mae('t', None)
    config.data_seed = 3
    out = bench.bench_input(config, str(data_dir), n=4, workers=[], target=1000.0)
    assert set(out['per_image_s']) == {'rendered', 'prepared'}
    assert len(out['rates']) == 6 and all(r > 0 for r in out['rates'].values())
    assert '1,000 images/s needs' in capsys.readouterr().out


def test_an_unprepared_folder_is_not_reported_as_broken(tmp_path, caplog):
    from sce_mae_jax.data.builders import synthetic as stored
    builder = stored.builder(0, True, str(tmp_path / 'never_written'))
    with caplog.at_level('WARNING'):
        assert not sources.is_prepared(builder)
    assert 'dataset_info' not in caplog.text  # TFDS warns so for a folder that does not exist
