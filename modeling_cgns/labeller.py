"""Rule-based sentence labeller for the 14 CheXpert observations, and sentence meanings for clustering.

The approach is the one CheXpert's labeller and NegBio published: find *mentions* of each observation
from term lists, then decide each mention's value from negation and uncertainty *cues* before and after
it, within the mention's clause. The rules and term lists here are written for this project
(docs/labeller.md lists them with their measured accuracy on the IU-Xray reports).

Text is normalised first the way ``modeling_cgns.sentences.split_sentences`` normalises report
sentences (lower case, ``\\w+`` tokens; hyphens, slashes and commas become spaces), except that ``;``,
``:`` and full stops inside the text are kept as clause boundaries. A raw sentence and its
``split_sentences`` form therefore get the same labels.

Per mention (first rule that applies wins):

1. a double-negative uncertainty cue in scope ("cannot be excluded", "not ruled out", ...) -> -1;
2. of the remaining cues in scope, the one nearest the mention decides: negation ("no", "without",
   "free of", "negative for", "resolved", "is not seen", ...) -> 0, uncertainty ("possible", "may",
   "suggest", "concerning for", "versus", "cannot be excluded", ...) -> -1; an uncertainty cue of the
   form "to suggest" that follows a negation ("no consolidation to suggest pneumonia") stays negative;
3. two finding mentions joined by "or" / "versus" / "and/or" ("atelectasis or pneumonia") -> -1 each;
4. otherwise -> 1.

A cue is in scope when it lies in the same clause (clauses end at ``;``, ``:``, "but", "however",
"although", "which", "whereas", "except", "other than", ...) and close enough: a negation before the
mention reaches at most ``_PRE_NEGATION_WORDS`` words and stops at a verb ("no effusion is seen the
heart is enlarged"), an uncertainty cue before it at most ``_PRE_UNCERTAINTY_WORDS`` words, a
hypothetical one ("recommend", "consider", "to exclude", "if") ``_HYPOTHETICAL_WORDS``; a negation after
the mention reaches ``_POST_WORDS`` words, an uncertainty after it two words and needs its copula
("pneumonia is likely", not "opacity, likely atelectasis"). "No change", "no interval change", "not
changed" and "no increase" are not negations.

Size and normality statements are mentions with a fixed value: "heart size is normal" gives
Cardiomegaly 0, "the mediastinum is within normal limits" Enlarged Cardiomediastinum 0, a normal
cardiomediastinal silhouette both 0; "the heart is enlarged", "enlarged cardiomediastinal silhouette" and
"borderline cardiomegaly" give Cardiomegaly 1 (borderline and mild are severities, not doubt).

No Finding: a sentence that states a global normal ("no acute cardiopulmonary process", "normal chest",
"no active disease", "lungs are clear", "negative exam") gets "No Finding": 1, unless it also has a
positive or uncertain pathology (any observation but No Finding and Support Devices). A sentence never
gets "No Finding" 0 or -1; the report-level rule (``report_labels``) is CheXpert's: No Finding when no
pathology is positive.

Several values for one observation in a sentence combine as positive > uncertain > negative.
"""
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
# observations that block "No Finding" (CheXpert: every one but No Finding and Support Devices)
PATHOLOGIES = tuple(o for o in OBSERVATIONS if o not in ("No Finding", "Support Devices"))

_PRE_NEGATION_WORDS = 12
_PRE_UNCERTAINTY_WORDS = 8
_POST_WORDS = 6
_HYPOTHETICAL_WORDS = 16


def _rx(pattern: str) -> "re.Pattern":
    return re.compile(pattern)


# ---------------------------------------------------------------------------------------------------------
# mentions: (observations, pattern, fixed value or None for "decided by cues", is_finding)
# ``is_finding`` mentions take part in the "A or B" alternative rule.
# ---------------------------------------------------------------------------------------------------------
_HEART = r"(?:heart|heart size|cardiac (?:silhouette|size|shadow|contour|contours|outline|diameter)|cardiac)"
_MEDIASTINUM = (r"(?:(?:upper|superior) )?(?:mediastinal|mediastinum|paratracheal)"
                r"(?: (?:silhouette|silhouettes|contour|contours|width|shadow|outline|structures|stripe|"
                r"soft tissues?|region))?")
# the cardiomediastinal silhouette: enlarged it is read as the heart (Cardiomegaly), normal as both normal
_CARDIOMEDIASTINAL = (r"(?:cardiomediastinal|cardio mediastinal|cardiomediastinum|cardiopericardial|cardiothymic)"
                      r"(?: (?:silhouette|silhouettes|contour|contours|width|shadow|outline|structures))?")
_ENLARGED = r"(?:enlarged|enlargement|large|widened|widening|wide|prominent|prominence|increased|expanded)"
_SEVERITY = (r"(?:(?:is|are|appears|appear|remains|remain|seems|was|were|again|still|now|stable|stably|"
             r"slightly|mildly|moderately|markedly|severely|massively|minimally|borderline|significantly|"
             r"somewhat|very|top|upper|mild|moderate|marked|severe|normal|at|the|in|size|of|xxxx|be|to|also|"
             r"overall|grossly) )")
_NORMAL = (r"(?:normal|within normal limits|within the normal limits|within normal range|unremarkable|"
           r"not enlarged|not widened|not significantly enlarged|upper limits? of normal|upper normal|"
           r"top normal|top of normal|high normal|normal in size|normal size|normal in contour|stable and normal)")

_MENTIONS: List[Tuple[Tuple[str, ...], "re.Pattern", Optional[int], bool]] = []


def _mention(observations, pattern: str, value: Optional[int] = None, finding: bool = True):
    if isinstance(observations, str):
        observations = (observations,)
    _MENTIONS.append((tuple(observations), _rx(pattern), value, finding))


# --- No Finding: global normal statements (fixed value 1) ---
_mention("No Finding",
         r"\bno (?:(?:acute|active|evidence of|significant|radiographic|definite|focal|other|gross|"
         r"acute or active|active or acute|acute radiographic|visible|apparent|obvious) )+"
         r"(?:(?:cardiopulmonary|cardiac or pulmonary|cardiothoracic|cardiopulmonary or osseous|"
         r"pulmonary|intrathoracic|thoracic|chest|lung|cardiac|osseous and cardiopulmonary) )?"
         r"(?:disease|diseases|process|processes|abnormality|abnormalities|findings?|pathology|"
         r"infiltrates? or effusions?)\b", POSITIVE, False)
_mention("No Finding",
         r"\b(?:normal|negative|unremarkable) (?:(?:pa and lateral|pa|lateral|frontal|portable|two view|"
         r"2 view|single view|ap) )?(?:chest|exam|examination|study|radiograph|x ray|xray|film|"
         r"chest x ray|chest radiograph|chest xray|chest film|chest examination|chest exam|radiographs)\b",
         POSITIVE, False)
_mention("No Finding",
         r"\b(?:chest|exam|examination|study|chest x ray|chest radiograph|radiograph) (?:is|are|appears|"
         r"remains) (?:(?:otherwise|essentially|grossly|radiographically) )?(?:normal|negative|unremarkable)\b",
         POSITIVE, False)
_mention("No Finding",
         r"\b(?:the )?(?:lungs|lung fields|lung parenchyma|both lungs|lungs bilaterally) (?:are|is|appear|appears|"
         r"remain|remains) (?:(?:otherwise|essentially|grossly|again|now|both|well expanded and|"
         r"hyperexpanded and|hyperinflated and|expanded and|clear and|well aerated and) )*clear\b(?! of)",
         POSITIVE, False)
_mention("No Finding", r"\bclear lungs\b|\blungs clear\b(?! of)", POSITIVE, False)
_mention("No Finding",
         r"\b(?:the )?heart and lungs (?:are|appear|remain) (?:(?:otherwise|essentially|grossly|again) )?"
         r"(?:normal|within normal limits|unremarkable|clear)\b", POSITIVE, False)
_mention("No Finding", r"\b(?:no|without) (?:(?:acute|active) )?(?:cardiopulmonary|intrathoracic) "
         r"(?:abnormality|disease|process)\b", POSITIVE, False)

# --- Enlarged Cardiomediastinum ---
_mention("Enlarged Cardiomediastinum", r"\b" + _MEDIASTINUM + r" (?:" + _SEVERITY + r"{0,4})" + _NORMAL + r"\b",
         NEGATIVE, False)
_mention("Enlarged Cardiomediastinum", r"\bnormal (?:size(?:d)? )?(?:and contour )?" + _MEDIASTINUM + r"\b",
         NEGATIVE, False)
_mention(("Enlarged Cardiomediastinum", "Cardiomegaly"),
         r"\b" + _CARDIOMEDIASTINAL + r" (?:" + _SEVERITY + r"{0,4})" + _NORMAL + r"\b", NEGATIVE, False)
_mention(("Enlarged Cardiomediastinum", "Cardiomegaly"),
         r"\bnormal (?:size(?:d)? )?(?:and contour )?" + _CARDIOMEDIASTINAL + r"\b", NEGATIVE, False)
_mention("Cardiomegaly", r"\b" + _CARDIOMEDIASTINAL + r" (?:" + _SEVERITY + r"{0,4})" + _ENLARGED + r"\b")
_mention("Cardiomegaly", r"\b(?:(?:mildly|slightly|moderately|markedly) )?(?:enlarged|enlargement of the|"
         r"prominent|prominence of the|increased) " + _CARDIOMEDIASTINAL + r"\b")
_mention("Enlarged Cardiomediastinum", r"\b" + _MEDIASTINUM + r" (?:" + _SEVERITY + r"{0,4})" + _ENLARGED + r"\b")
_mention("Enlarged Cardiomediastinum",
         r"\b(?:(?:mildly|slightly|moderately|markedly|mild|nonspecific|stable) )*(?:widened|widening|enlarged|"
         r"enlargement|prominent|prominence|wide|convexity)(?: of(?: the)?)?(?: (?:right|left))? " + _MEDIASTINUM
         + r"\b")

# --- Cardiomegaly ---
_mention("Cardiomegaly", r"\bcardiomegaly\b|\bcardiac enlargement\b|\bcardiomyopathy\b")
_mention("Cardiomegaly", r"\b" + _HEART + r" (?:" + _SEVERITY + r"{0,5})" + _NORMAL + r"\b", NEGATIVE, False)
_mention("Cardiomegaly", r"\bnormal (?:(?:sized?|appearing) )?" + _HEART + r"(?: size)?\b", NEGATIVE, False)
_mention("Cardiomegaly", r"\b" + _HEART + r" (?:" + _SEVERITY + r"{0,5})(?:enlarged|enlargement|large|"
         r"increased in size|prominent|borderline)\b")
_mention("Cardiomegaly", r"\b(?:(?:mildly|slightly|moderately|markedly|borderline) )?(?:enlarged|large|"
         r"enlargement of the|increased) " + _HEART + r"\b")
_mention("Cardiomegaly", r"\bheart size (?:is |remains )?(?:(?:mildly|slightly|moderately|markedly) )?"
         r"(?:increased|enlarged)\b|\bborderline (?:heart|cardiac) size\b|"
         r"\b(?:heart|cardiac) size (?:is )?borderline\b")
_mention("Cardiomegaly", r"\b(?:increase|increased|enlargement|prominence) (?:in|of) (?:the )?"
         r"(?:heart size|cardiac size|"
         r"size of the (?:heart|cardiac silhouette)|(?:\w+ )?cardiac silhouette|heart)\b")

# --- Lung Opacity ---
_mention("Lung Opacity",
         r"\b(?:opacity|opacities|opacification|opacifications|opacified|opaque|infiltrate|infiltrates|"
         r"infiltration|infiltrative|airspace disease|air space disease|airspace process|air space process|"
         r"airspace|air space|ground glass|haziness|hazy|reticular|reticulation|reticulonodular|"
         r"interstitial (?:markings?|opacities|opacity|prominence|pattern|changes?|disease|lung disease|"
         r"thickening|process)|"
         r"scarring|scar|scars|fibrosis|fibrotic|density|densities|bronchial wall thickening|"
         r"peribronchial (?:thickening|cuffing)|parenchymal (?:scarring|changes?)|increased markings|"
         r"increased (?:interstitial|lung|pulmonary) markings)\b")

# --- Lung Lesion ---
_mention(("Lung Opacity", "Lung Lesion"),
         r"\b(?:(?:nodular|masslike|mass like|fibronodular) (?:opacity|opacities|opacification|density|densities|"
         r"infiltrates?|scarring|changes?)|fibronodular)\b")
_mention("Lung Lesion",
         r"\b(?:nodule|nodules|nodular lesions?|nodular|masslike|"
         r"mass|masses|tumor|tumors|tumour|neoplasm|neoplasms|carcinoma|cancer|malignancy|malignancies|"
         r"metastasis|metastases|metastatic disease|cavitary lesion|cavitary lesions|cavitation|"
         r"(?<!thoracic )(?<!pleural )(?<!abdominal )(?<!glenoid )(?<!chest )cavity|"
         r"(?:lung|pulmonary|parenchymal|cavitary|spiculated) lesions?)\b")

# a granuloma (healed infection) is not a lung lesion; a calcified nodule still is (as in CheXpert)
_mention((), r"\b(?:calcified )?(?:granulomas?|granulomata|histoplasmomas?)\b", None, False)

# --- Edema ---
_mention("Edema",
         r"\b(?:edema|oedema|pulmonary vascular congestion|vascular congestion|pulmonary congestion|congestion|"
         r"congestive heart failure|congestive failure|heart failure|chf|fluid overload|volume overload|"
         r"vascular engorgement|engorged|engorgement|congestive changes|congestive|cephalization|kerley b lines|"
         r"interstitial edema|vascular prominence|vascular redistribution|pulmonary venous hypertension|"
         r"(?:indistinct|indistinctness of|indistinct pulmonary|hazy) (?:the )?vascular "
         r"(?:margins|margination|markings)|"
         r"(?:prominent|increased|prominence of the|indistinct) (?:central |pulmonary |central pulmonary )?"
         r"(?:vasculature|vascularity|vascular markings))\b")
_mention("Edema",
         r"\b(?:pulmonary )?(?:vascularity|vasculature|vascular markings|vessels) (?:" + _SEVERITY + r"{0,4})"
         r"(?:normal|within normal limits|unremarkable)\b", NEGATIVE, False)
_mention("Edema", r"\bnormal (?:pulmonary )?(?:vascularity|vasculature)\b", NEGATIVE, False)

# --- Consolidation ---
_mention("Consolidation", r"\b(?:consolidation|consolidations|consolidative|consolidated)\b")

# --- Pneumonia ---
_mention((), r"\b(?:granulomatous|tuberculous|mycobacterial|fungal) (?:infection|infections|disease|process)\b|"
         r"\b(?:old|prior|previous|remote|healed|sequela of|sequelae of) (?:\w+ ){0,2}(?:infection|infections|"
         r"infectious process)\b", None, False)
_mention("Pneumonia", r"\b(?:pneumonia|pneumonias|pneumonitis|bronchopneumonia|infection|infections|infectious|"
         r"infectious process|inflammatory process|aspiration)\b")

# --- Atelectasis ---
_mention("Atelectasis", r"\b(?:atelectasis|atelectases|atelectatic|(?:lobar|lung|lobe|segmental) collapse|"
         r"collapse of the (?:\w+ ){0,3}(?:lobe|lung)|collapsed (?:lung|lobe))\b")

# --- Pneumothorax ---
_mention("Pneumothorax", r"\b(?:pneumothorax|pneumothoraces|pneumothoraxes|ptx)\b")
_mention(("Pneumothorax", "Pleural Effusion"), r"\b(?:hydropneumothorax|hydropneumothoraces|"
         r"hemopneumothorax)\b")

# --- Pleural Effusion ---
_mention("Pleural Effusion", r"\b(?:effusion|effusions|pleural fluid|hydrothorax|hemothorax|"
         r"fluid in the (?:\w+ )?(?:fissure|pleural space))\b")
_mention((), r"\bpericardial effusions?\b|\bjoint effusions?\b", None, False)  # not pleural: claims the span

# --- Pleural Other ---
_mention("Pleural Other", r"\b(?:pleural (?:thickening|plaque|plaques|scarring|scar|calcification|"
         r"calcifications|reaction|disease)|pleural parenchymal (?:scarring|thickening|changes?)|"
         r"pleuroparenchymal (?:scarring|thickening|changes?|opacity|opacities)|fibrothorax|"
         r"thickening of the (?:\w+ )?pleura|pleural based (?:thickening|opacity|density)|"
         r"apical (?:pleural )?(?:capping|cap|thickening)|pleural (?:\w+ )?(?:thickening|scarring)|"
         r"pleural abnormality)\b")

# --- Fracture ---
_mention("Fracture", r"\b(?:fracture|fractures|fractured|fx|fractures or dislocations)\b")
# a broken device is not a bone fracture
_DEVICE_PART = r"(?:screws?|leads?|wires?|catheter|catheters|plates?|rods?|xxxx)"
_mention("Support Devices", r"\b" + _DEVICE_PART + r" (?:(?:is|are|appears?|now) )?fractured\b|"
         r"\bfractured (?:\w+ ){0,2}"
         + _DEVICE_PART + r"\b|\bfracture of (?:the )?(?:\w+ ){0,3}" + _DEVICE_PART + r"\b|\b"
         + r"(?:catheter|lead|wire) fracture\b")

# --- Support Devices ---
_mention("Support Devices",
         r"\b(?:pacemaker|pacemakers|pacer|pacers|defibrillator|aicd|icd|pacing (?:wires?|leads?|device)|"
         r"leads?|catheter|catheters|picc|central (?:venous )?line|venous line|(?:port|portacath|port a cath|"
         r"mediport|powerport|chest port|infusion port)|"
         r"lines and tubes|tubes and lines|support (?:lines|devices)|monitoring (?:and support )?devices|ett|ngt|ogt|"
         r"swan ganz|impella|iabp|intra aortic balloon pump|lvad|ecmo cannulas?|cannulas?|"
         r"(?:endotracheal|tracheostomy|nasogastric|orogastric|feeding|chest|enteric|gastric|ng|et|og|dobhoff)"
         r" tubes?|tracheostomy|sternal wires?|sternal sutures?|sternotomy wires?|wires?|surgical clips?|clips?|"
         r"staples|sutures?|suture material|hardware|fixation|(?:fixation )?(?:plate|plates|screws?|rods?)|"
         r"stents?|valve replacement|(?:prosthetic|mechanical|artificial) (?:aortic |mitral )?valves?|"
         r"valve prosthesis|device|devices|generator|electrodes?|drains?|coils?|ivc filter|prosthesis|"
         r"arthroplasty|(?:spinal|spine|cervical|lumbar|thoracic|anterior cervical) fusion|fusion hardware|vp shunt|"
         r"shunt tubing|loop recorder|stimulator|bone anchors?|(?:\w+ )?prosthesis|prosthetic (?:\w+ )?"
         r"(?:shoulder|hip|knee|joint|humerus|valve)|tip (?:is |projects|projecting|overlies|overlying|terminates|"
         r"terminating|at|in|over)|with (?:its |the )?(?:distal )?tip)\b")
_mention((), r"\bbreast (?:implants?|prosthes[ie]s)\b|\bmass effect\b|\b(?:left to right|right to left) shunt\b",
         None, False)

# ---------------------------------------------------------------------------------------------------------
# cues
# ---------------------------------------------------------------------------------------------------------
_CLAUSE_BOUNDARY = _rx(r";|\b(?:but|however|although|though|which|whereas|while|except|apart from|other than|"
                       r"aside from|with the exception of|otherwise|nevertheless|yet|that may|that could|"
                       r"and there (?:is|are)|there (?:is|are|has been|may be|could be))\b")
_DOUBLE_NEGATIVE_PRE = _rx(r"\b(?:cannot|can not|can t|could not|not) (?:be )?(?:entirely |completely |"
                           r"totally |definitely |fully )?(?:exclude|excluded|rule out|ruled out|"
                           r"be excluded)\b|\bdifficult to exclude\b|\bnot (?:entirely )?excluded\b|"
                           r"\bno (?:definite )?(?:exclusion)\b")
_DOUBLE_NEGATIVE_POST = _rx(r"\b(?:cannot|can not|can t|could not|not|is not|are not|may not) (?:be )?"
                            r"(?:\w+ly |entirely |completely |totally |definitely |fully )?(?:excluded|ruled out|"
                            r"exclude|rule out)\b")
_PSEUDO_NEGATION = _rx(r"\b(?:no|without|not) (?:(?:significant|substantial|appreciable|definite|"
                       r"significant interval|interval|other|further|real) )?(?:change|changes|changed|"
                       r"increase|increased|decrease|decreased|worsening|progression|improvement)\b|"
                       r"\bnot (?:only|necessarily)\b|\bno longer\b(?= (?:changed|increase))")
_PRE_NEGATION = _rx(r"\b(?:no|without|free of|clear of|negative for|absence of|absent|resolution of|"
                    r"resolved|resolving|removal of|removed|interval removal of|no longer|nor|neither|"
                    r"not|rather than|instead of)\b")
_NEGATION_STOP = _rx(r"\b(?:is|are|was|were|has|have|had|be|been|appears|appear|seen|noted|there|"
                     r"remains|remain|demonstrates|shows|persists)\b")
_POST_NEGATION = _rx(r"^(?:\w+ ){0,%d}?(?:(?:is|are|was|were|has|have|has been|have been|had been) )?"
                     r"(?:(?:not|no longer) (?:\w+ly |well |xxxx )?(?:be )?(?:seen|identified|present|evident|"
                     r"demonstrated|"
                     r"visualized|visible|appreciated|noted|detected|apparent|shown|seen or suspected|"
                     r"enlarged|widened)|(?:resolved|cleared|removed|absent|negative|gone|"
                     r"been removed|been resolved|resolving|withdrawn))\b" % _POST_WORDS)
_HYPOTHETICAL = _rx(r"\b(?:differential|recommend|recommended|recommendation|consider|considered|"
                     r"further evaluation|evaluation of|evaluate|to identify|to exclude|exclude|if|followup|"
                     r"follow up|risk factors?|history of)\b")
_PRE_UNCERTAINTY = _rx(r"\b(?:possible|possibly|possibility of|probable|probably|may|might|could|question of|"
                       r"questionable|"
                       r"question|suspicious|suspicion|suspected|suspect|concerning|concern|worrisome|"
                       r"suggest|suggests|suggested|suggesting|suggestive|likely|unlikely|versus|vs|"
                       r"differential|equivocal|indeterminate|uncertain|presumed|presumably|favor|favored|"
                       r"favoured|cannot|vague|correlate|correlation|either|to suggest|to indicate|evaluate for|"
                       r"assess for|rule out)\b")
# after the mention: an adjective needs its copula ("pneumonia is likely", not "opacity, likely atelectasis")
_POST_UNCERTAINTY = _rx(r"^(?:\w+ ){0,2}?(?:(?:(?:is|are|was|were|appears?|seems?) (?:also |most |more |less |"
                        r"very |quite )?(?:possible|probable|likely|unlikely|questionable|in question|"
                        r"suspected|suggested|considered|favored))|(?:suspected|questioned|suggested|favored|"
                        r"considered|or not|versus|vs))\b")
_NEGATION_INHERITING_UNCERTAINTY = _rx(r"\b(?:to suggest|to indicate|suggestive|suggesting|to represent|"
                                       r"that would suggest|concerning|worrisome|suspicious|to account)\b")
_ALTERNATIVE = _rx(r"^ (?:and or|or|versus|vs|or possibly|or less likely|or more likely|or possible) "
                   r"(?:\w+ ){0,3}$")


def normalise_text(text: str) -> str:
    """Lower-case ``\\w+`` tokens joined by single spaces (as ``split_sentences`` does); punctuation dropped."""
    tokens = re.findall(r"\w+", (text or "").lower())
    tokens = [t.encode("ascii", "ignore").decode() for t in tokens]
    return " ".join(t for t in tokens if t)


def _prepare(sentence: str) -> str:
    """Normalise like ``normalise_text`` but keep ``;``, ``:`` and sentence-internal full stops as `` ; ``."""
    text = (sentence or "").lower().replace("\r", " ").replace("\n", " ")
    text = re.sub(r"(?<!\d)\.(?!\d)|[;:!?]", " ; ", text)
    pieces = [normalise_text(p) for p in text.split(";")]
    return " ; ".join(p for p in pieces if p)


def _clauses(text: str) -> List[Tuple[int, int]]:
    """Character spans of the clauses of ``text`` (boundaries excluded)."""
    spans, start = [], 0
    for m in _CLAUSE_BOUNDARY.finditer(text):
        spans.append((start, m.start()))
        start = m.end() if m.group(0) == ";" else m.start()
    spans.append((start, len(text)))
    return spans


def _word_count(text: str) -> int:
    return len(text.split())


def _cue_spans(pattern: "re.Pattern", text: str, masked: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    out = []
    for m in pattern.finditer(text):
        if any(m.start() < e and s < m.end() for s, e in masked):
            continue
        out.append((m.start(), m.end()))
    return out


def _mention_value(text: str, clause: Tuple[int, int], start: int, end: int,
                   masked: Sequence[Tuple[int, int]]) -> Optional[int]:
    """Value the cues give the mention ``text[start:end]`` (None: no cue in scope); ``masked`` are the spans of the
    other mentions, whose words are not cues."""
    before = text[clause[0]:start]
    after = text[end:clause[1]]
    local_mask = [(s - clause[0], e - clause[0]) for s, e in masked]

    # 1. double negatives ("cannot exclude X", "X cannot be excluded") are uncertainty
    for m in _DOUBLE_NEGATIVE_PRE.finditer(before):
        if _word_count(before[m.end():]) <= _PRE_UNCERTAINTY_WORDS:
            return UNCERTAIN
    post = _DOUBLE_NEGATIVE_POST.search(after)
    if post and _word_count(after[:post.start()]) <= _POST_WORDS:
        return UNCERTAIN
    double_negative_spans = ([(m.start(), m.end()) for m in _DOUBLE_NEGATIVE_PRE.finditer(before)] +
                             [(m.start(), m.end()) for m in _PSEUDO_NEGATION.finditer(before)])
    double_negative_spans += local_mask

    # 2. the nearest cue decides (a tie goes to the negation)
    candidates = []  # (distance in words, value)
    negations = []
    for s, e in _cue_spans(_PRE_NEGATION, before, double_negative_spans):
        gap = before[e:]
        if _word_count(gap) <= _PRE_NEGATION_WORDS and not _NEGATION_STOP.search(gap):
            candidates.append((_word_count(gap), NEGATIVE))
            negations.append(s)
    for s, e in _cue_spans(_PRE_UNCERTAINTY, before, double_negative_spans):
        gap = before[e:]
        if _word_count(gap) <= _PRE_UNCERTAINTY_WORDS:
            inherits = (_NEGATION_INHERITING_UNCERTAINTY.match(before, s) is not None
                        and any(n < s for n in negations))
            candidates.append((_word_count(gap), NEGATIVE if inherits else UNCERTAIN))
    for s, e in _cue_spans(_HYPOTHETICAL, before, double_negative_spans):
        if _word_count(before[e:]) <= _HYPOTHETICAL_WORDS:
            candidates.append((_word_count(before[e:]), UNCERTAIN))
    after_text = after.lstrip()
    m = _POST_NEGATION.match(after_text)
    if m:
        candidates.append((_word_count(after_text[:m.end()]) - 1, NEGATIVE))
    m = _POST_UNCERTAINTY.match(after_text)
    if m:
        candidates.append((_word_count(after_text[:m.end()]) - 1, UNCERTAIN))
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c[0], c[1] != NEGATIVE))[1]


def _find_mentions(text: str) -> List[Tuple[int, int, Tuple[str, ...], Optional[int], bool]]:
    """Non-overlapping mentions, the longest match first ("pericardial effusion" hides "effusion")."""
    found = []
    for observations, pattern, value, finding in _MENTIONS:
        for m in pattern.finditer(text):
            if m.end() > m.start():
                found.append((m.start(), m.end(), observations, value, finding))
    found.sort(key=lambda f: (-(f[1] - f[0]), f[0]))
    kept = []
    for f in found:
        if all(f[1] <= k[0] or k[1] <= f[0] for k in kept):
            kept.append(f)
    kept.sort(key=lambda f: f[0])
    return kept


def _combine(values: Iterable[int]) -> int:
    values = set(values)
    for v in (POSITIVE, UNCERTAIN, NEGATIVE):
        if v in values:
            return v
    raise ValueError("no value to combine")


def label_sentence(sentence: str) -> Dict[str, int]:
    """Labels of one sentence: {observation: 1 / 0 / -1}; observations not mentioned are absent."""
    if not isinstance(sentence, str):
        raise TypeError(f"a sentence must be a str, got {type(sentence).__name__}")
    text = _prepare(sentence)
    if not text:
        return {}
    clauses = _clauses(text)
    mentions = _find_mentions(text)
    # cue words inside other mentions ("not enlarged") are theirs; a global normal's "no" reaches on
    mention_spans = [(s, e) for s, e, obs, _, _ in mentions if obs != ("No Finding",)]
    values: List[Optional[int]] = []
    for start, end, observations, fixed, _ in mentions:
        if fixed is not None or not observations:
            values.append(fixed)
            continue
        clause = next(((cs, ce) for cs, ce in clauses if cs <= start and end <= ce), (0, len(text)))
        others = [sp for sp in mention_spans if sp != (start, end)]
        values.append(_mention_value(text, clause, start, end, others))
    # 3. "A or B" alternatives between two finding mentions that no cue decided
    for i in range(len(mentions) - 1):
        a, b = mentions[i], mentions[i + 1]
        if not (a[4] and b[4]) or not _ALTERNATIVE.match(" " + text[a[1]:b[0]].strip() + " "):
            continue
        clause_start = next((cs for cs, ce in clauses if cs <= a[0] < ce), 0)
        if _PRE_NEGATION.search(text[clause_start:a[0]]) or _PSEUDO_NEGATION.search(text[clause_start:a[0]]):
            continue
        for j in (i, i + 1):
            if values[j] is None:
                values[j] = UNCERTAIN
    labels: Dict[str, List[int]] = {}
    for (_, _, observations, _, _), value in zip(mentions, values):
        for obs in observations:
            labels.setdefault(obs, []).append(POSITIVE if value is None else value)
    result = {obs: _combine(v) for obs, v in labels.items()}
    if "No Finding" in result and any(result.get(o) in (POSITIVE, UNCERTAIN) for o in PATHOLOGIES):
        del result["No Finding"]
    return {obs: result[obs] for obs in OBSERVATIONS if obs in result}


def label_sentences(sentences: Sequence[str]) -> List[Dict[str, int]]:
    """CheXpert-style labels of each sentence: a dict from observation name to 1 (positive), 0 (negative) or
    -1 (uncertain); observations a sentence does not mention are absent (docs/labeller.md)."""
    if isinstance(sentences, str):
        raise TypeError("label_sentences takes a list of sentences, not one string")
    cache: Dict[str, Dict[str, int]] = {}  # report sentences repeat heavily ("no pneumothorax")
    out = []
    for sentence in sentences:
        if sentence not in cache:
            cache[sentence] = label_sentence(sentence)
        out.append(dict(cache[sentence]))
    return out


def report_labels(sentence_labels: Sequence[Dict[str, int]], uncertain_as: int = NEGATIVE) -> Dict[str, int]:
    """Report-level 0/1 labels from its sentences' labels (docs/labeller.md).

    An observation is 1 when any sentence has it positive; a sentence's uncertain value counts as
    ``uncertain_as`` (0: U-Zeros, the default; 1: U-Ones). No Finding is CheXpert's rule: 1 exactly when
    no pathology (every observation but No Finding and Support Devices) is 1 after that.
    """
    if uncertain_as not in (NEGATIVE, POSITIVE):
        raise ValueError(f"uncertain_as must be 0 or 1, got {uncertain_as!r}")
    out = {obs: 0 for obs in OBSERVATIONS}
    for labels in sentence_labels:
        for obs, value in labels.items():
            if obs == "No Finding":
                continue
            if value == POSITIVE or (value == UNCERTAIN and uncertain_as == POSITIVE):
                out[obs] = 1
    out["No Finding"] = int(not any(out[o] for o in PATHOLOGIES))
    return out


def meaning_key(labels: Dict[str, int], sentence: str) -> str:
    """Canonical meaning of one labelled sentence: its sorted (observation, value) pairs, or, when it mentions
    no observation, ``"text:"`` + its normalised text."""
    if labels:
        return "|".join(f"{obs}={labels[obs]}" for obs in OBSERVATIONS if obs in labels)
    return "text:" + normalise_text(sentence)


def sentence_meanings(sentences: Sequence[str]) -> List[str]:
    """Hashable meaning of each sentence (``meaning_key`` of its labels): sentences with the same findings and
    polarities share a meaning whatever their phrasing; sentences with no observation share one only when
    their normalised text is identical."""
    return [meaning_key(lab, s) for lab, s in zip(label_sentences(sentences), sentences)]


def meaning_ids(meanings: Sequence[str]) -> Tuple[List[int], List[str]]:
    """Integer id per meaning (in order of first appearance) and the vocabulary: ``vocab[ids[i]] == meanings[i]``."""
    vocab: Dict[str, int] = {}
    ids = [vocab.setdefault(m, len(vocab)) for m in meanings]
    return ids, list(vocab)


__all__ = ["OBSERVATIONS", "PATHOLOGIES", "POSITIVE", "NEGATIVE", "UNCERTAIN", "normalise_text", "label_sentence",
           "label_sentences", "report_labels", "meaning_key", "sentence_meanings", "meaning_ids"]
