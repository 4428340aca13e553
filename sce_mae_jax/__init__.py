"""SCE-MAE in JAX. `from sce_mae_jax import Landmarker` loads a trained model for your own images
(landmarker.py); it is imported on first use, so `import sce_mae_jax` stays free of JAX."""


def __getattr__(name):
    if name == 'Landmarker':
        from sce_mae_jax.landmarker import Landmarker
        return Landmarker
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
