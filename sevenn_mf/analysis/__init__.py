"""The paper's experiments as tools (issue 6).

* :mod:`.methods` - baselines and multi-fidelity training from one YAML
  (``hf-only``, ``transfer``, ``delta``, ``mf``, ``mf-onehot``, ``mf-indexed``);
* :mod:`.delta` - pairing of structures labelled at two fidelities, the
  Delta-learning sum as an ASE calculator and as one TorchScript file;
* :mod:`.predict` - predictions of any method's result (one checkpoint at one
  fidelity, or a sum of checkpoints);
* :mod:`.learning_curve` - methods x HF-set sizes x seeds, resumable;
* :mod:`.hull` - mixing energies and energies above the hull (pymatgen);
* :mod:`.parity` - parity plots per fidelity.
"""
