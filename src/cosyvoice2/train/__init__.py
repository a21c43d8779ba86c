"""Training recipes for every network of the shipped model (``recipes/default_model.sh`` runs them in order).

* ``common``    distributed setup (torchrun or a plain process), the training loop, checkpoints, logs, CLI
* ``data``      the corpus manifest, length-bucketed dynamic batches, the feature cache
* ``extract``   speech tokens and speaker embeddings, extracted once into ``<cache>/*.safetensors``
* ``speaker``   speaker encoder: convert Resemblyzer's bundled weights into our own file
* ``tokenizer`` the supervised FSQ speech tokenizer (CTC ASR objective)
* ``lm``        the text BPE and the text-speech LM (uni-stream and bistream layouts)
* ``flow``      the flow-matching decoder (OT-CFM, condition dropout, unified chunk/full masks)
* ``hift``      the HiFT vocoder (GAN: multi-period + multi-resolution spectrogram discriminators)
* ``export``    assemble a native model directory (``cosyvoice2.default_model``)

Every trainer runs the same way with or without torchrun::

    python -m cosyvoice2.train.lm --config recipes/conf/lm.toml --set train.max_steps=100
    torchrun --nproc_per_node=4 -m cosyvoice2.train.lm --config recipes/conf/lm.toml
"""
