"""What a program communicates: the HLO reader, bytes per step read from it, and analytic volumes."""
