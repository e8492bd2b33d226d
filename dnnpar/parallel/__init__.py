"""Parallel training, one module per strategy (ChainerMN's shape), each strategy a
:class:`dnnpar.engine.Strategy` run by the one epoch driver (:func:`dnnpar.engine.run`) and
returning its :class:`~dnnpar.reporting.RunResult`:

- ``comm``           communicators: MPI (mpi4py) and NCCL (CuPy, bootstrapped over MPI), with a
                     watchdog so a dead or silent rank ends the job with an error, never a hang
- ``data_parallel``  synchronous data parallel SGD: gradients as bucket views, each bucket's allreduce
                     started from backward; K micro-batches per step
- ``hogwild``        lock-free asynchronous SGD over shared memory inside one machine
- ``ps``             parameter server on Ray: sharded servers, BSP / SSP / ASP, fault tolerance (a
                     package: consistency, server, worker, cluster, driver)
- ``model_parallel`` AlexNet's two-column split over two ranks or devices, and the hybrid
- ``plan``           communication models and scaling predictions (``dnnpar plan``)

MPI, NCCL and Ray are imported only by the modules that use them (``pip install dnnpar[dist]``).
"""
