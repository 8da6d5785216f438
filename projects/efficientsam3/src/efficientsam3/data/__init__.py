"""SA-1B reading and the two preprocessing modes."""
