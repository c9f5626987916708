"""The package's public face: every name in ``qsharp_jax.__all__`` resolves to its module's object."""


def test_the_public_face_resolves():
    import qsharp_jax
    from qsharp_jax import guidance, losses, rollout

    assert qsharp_jax.generate is rollout.generate and qsharp_jax.losses is losses and qsharp_jax.guidance is guidance
    for name in qsharp_jax.__all__:
        assert getattr(qsharp_jax, name) is not None, name
