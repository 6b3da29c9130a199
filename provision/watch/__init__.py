"""What follows a launched job on the box for its whole life: the guard process and its parts."""
