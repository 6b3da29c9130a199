"""Renting boxes on vast.ai: search, create, wait for SSH, check fitness, list and destroy.

`vast.py` is the only module that imports the `vastai` package (an API change is one place to
fix); `store.py` keeps what this controller rented (named targets, a cost ledger, machines found
bad); `fitness.py` checks a new box in its first minute; `renter.py` is the rent loop that swaps
a bad box for the next offer; `manage.py` lists bootstrap's instances and takes them down.
"""
