"""The device side of a Jetson target: the bundle a device builds its engines from and runs
(:mod:`deploykit.device.bundle`, with the device's own scripts in ``scripts/``), and driving a device
over SSH (:mod:`deploykit.device.ssh`, :mod:`deploykit.device.remote_bench`)."""
