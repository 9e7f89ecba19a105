"""``chiba-admin predict``: each staging and synchronisation method simulated with SimGrid
on a topology's network, and checked against measured benchmark records."""
