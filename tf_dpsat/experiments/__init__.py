"""The experiment kit: the binary's training pipeline, datasets, models, reports.

Apart from the core on purpose: `import tf_dpsat` never imports this package,
and its extra dependencies (tensorflow-datasets, matplotlib, tensorboard,
scikit-learn) come with `pip install "tf_dpsat[experiments]"`. Import the
modules directly:

    from tf_dpsat.experiments import datasets  # load_dataset, normalize
    from tf_dpsat.experiments import models    # DPNASNet, tb_cnn, resnet10_gn, mlp
    from tf_dpsat.experiments import training  # the library of train_cifar.py
    from tf_dpsat.experiments import reporting # compares finished runs
"""
